"""gRPC API of the service: ``omnipose.proto`` and its generated modules (regenerate with
``python -m proto.generate``; never edit the ``*_pb2*`` files by hand)."""
