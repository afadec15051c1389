"""Generated Python stubs of the gRPC API in ``proto/omnipose.proto`` (package ``omnipose.v1``).

Clients write ``from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc``. Regenerate with
``python -m omnipose.proto.generate``; never edit ``*_pb2*`` by hand.
"""
