"""Generated Python stubs of the gRPC API in ``proto/omnipose.proto`` (package ``omnipose.v1``).

Clients write ``from omnipose_grpc import omnipose_pb2, omnipose_pb2_grpc``. The package is not
named ``proto`` because proto-plus, installed by most Google Cloud client libraries, owns that
import name. Regenerate with ``python -m omnipose_grpc.generate``; never edit ``*_pb2*`` by hand.
"""
