"""The application layer: person detection, the CLI, and the REST + gRPC pose service."""
