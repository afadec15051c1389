"""Property-based fuzzing of the live server: schemathesis generates requests
from the REST server's own OpenAPI schema (valid and invalid: wrong types, missing fields, odd
strings, negative and huge numbers) and Hypothesis generates gRPC messages, including raw bytes
that are not protobuf at all. Nothing may answer a 5xx / INTERNAL / UNKNOWN, and the server
keeps serving. A bounded number of cases runs here; ``bench/fuzz.py`` runs many more."""

from __future__ import annotations

import os

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from omnipose.proto import omnipose_pb2 as pb
from omnipose.proto import omnipose_pb2_grpc
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

# A few hundred cases in total in CI; FUZZ_EXAMPLES raises it (bench/fuzz.py).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CLIENT_DEADLINE_HEADER = "X-Request-Timeout"
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def test_rest_never_answers_5xx(server: ServerProcess) -> None:
    """Every operation of the live OpenAPI schema, EXAMPLES generated cases each."""
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/pose", "/v1/pose/batch", "/v1/models"}
    failures = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(timeout=60)
            if response.status_code == 504 and CLIENT_DEADLINE_HEADER in (case.headers or {}):
                # the documented answer to a deadline the client itself set too short
                assert response.json()["error"]["code"] == "deadline_exceeded", response.text
                return
            case.validate_response(response, checks=[not_a_server_error])

        try:
            check()
        except Exception as exc:  # collect every operation's first failure
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n".join(failures)


def _call_ok(error: grpc.RpcError) -> None:
    assert error.code() not in SERVER_ERRORS, f"{error.code()}: {error.details()}"


boxes = st.lists(
    st.builds(
        pb.Box,
        x=st.floats(allow_nan=True, allow_infinity=True, width=32),
        y=st.floats(width=32),
        width=st.floats(width=32),
        height=st.floats(width=32),
    ),
    max_size=5,
)
requests = st.builds(
    pb.EstimateRequest,
    image=st.one_of(st.binary(max_size=512), st.just(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)),
    flip=st.booleans(),
    min_keypoint_score=st.floats(width=32),
    min_instance_score=st.floats(width=32),
    min_box_score=st.floats(width=32),
    max_persons=st.integers(min_value=0, max_value=2**32 - 1),
    render=st.booleans(),
)


@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(request=requests, box_list=st.one_of(st.none(), boxes))
def test_grpc_messages_never_get_a_server_error(server: ServerProcess, request, box_list) -> None:
    if box_list is not None:
        request.boxes.boxes.extend(box_list)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        try:
            stub.Estimate(request, timeout=30)
        except grpc.RpcError as error:
            _call_ok(error)
        try:
            stub.EstimateBatch(pb.EstimateBatchRequest(images=[request, request]), timeout=30)
        except grpc.RpcError as error:
            _call_ok(error)


@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(data=st.binary(max_size=256))
def test_raw_bytes_never_get_a_server_error(server: ServerProcess, data: bytes) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method in ("Estimate", "EstimateBatch", "GetModel"):
            call = channel.unary_unary(f"/omnipose.v1.PoseEstimation/{method}")
            try:
                call(data, timeout=30)
            except grpc.RpcError as error:
                _call_ok(error)
        stream = channel.stream_stream("/omnipose.v1.PoseEstimation/StreamEstimate")
        try:
            list(stream(iter([data, data]), timeout=30))
        except grpc.RpcError as error:
            _call_ok(error)
