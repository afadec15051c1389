"""The application layer: person detection, the engine, and the REST + gRPC pose service."""
