"""The request options' one declaration (service/options.py) against everything that follows it:
the .proto's EstimateRequest (the wire contract), the gRPC mapping, the range checks and their
messages, REST's query parameters and OpenAPI, and README's table."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from omnipose.proto import omnipose_pb2
from omnipose.service.errors import ErrorCode, InvalidRequest
from omnipose.service.grpc_server import to_image_request
from omnipose.service.options import (
    RequestOptions,
    grpc_field_names,
    is_optional,
    option_field,
    option_names,
    options_from_message,
    options_table,
    rules_of,
    transport_of,
    value_type,
)
from omnipose.service.requests import ImageRequest
from omnipose.service.rest import BATCH_QUERY, ONE_IMAGE_QUERY

ROOT = Path(__file__).resolve().parent.parent
PROTO_FIELDS = omnipose_pb2.EstimateRequest.DESCRIPTOR.fields_by_name
PROTO_TYPES = {
    bool: {FieldDescriptor.TYPE_BOOL},
    float: {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE},
    int: {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT64,
          FieldDescriptor.TYPE_INT64},
    str: {FieldDescriptor.TYPE_STRING},
}


# --- the .proto agrees with the options ------------------------------------------------------
def test_estimate_request_holds_the_image_and_exactly_the_grpc_options() -> None:
    on_grpc = {name for name in option_names()
               if transport_of(name) is None or transport_of(name).grpc_message is not None}
    assert set(PROTO_FIELDS) - {"image"} == on_grpc


@pytest.mark.parametrize("name", grpc_field_names())
def test_plain_option_has_the_proto_type_and_optionality(name: str) -> None:
    field = PROTO_FIELDS[name]
    assert not field.is_repeated, name
    assert field.type in PROTO_TYPES[value_type(name)], (name, field.type)
    if is_optional(name):
        # "Not given" must be expressible: proto presence, or a zero value outside the option's
        # range (so reading it as "not given" loses no valid setting).
        zero_is_invalid = any(rule.problem(name, field.default_value) for rule in rules_of(name))
        assert field.has_presence or zero_is_invalid, (
            f"{name}: mark it 'optional' in the .proto, its zero value is a valid setting")
    else:
        assert not field.has_presence, f"{name} has a default; drop 'optional' in the .proto"
        assert field.default_value == option_field(name).default, name


def test_structured_options_name_their_proto_message() -> None:
    structured = [n for n in option_names() if transport_of(n) and transport_of(n).grpc_message]
    assert structured == ["boxes"]
    for name in structured:
        field = PROTO_FIELDS[name]
        assert field.type == FieldDescriptor.TYPE_MESSAGE
        assert field.message_type.name == transport_of(name).grpc_message


# --- gRPC -> options -------------------------------------------------------------------------
def test_an_empty_estimate_request_gives_the_default_options() -> None:
    values = options_from_message(omnipose_pb2.EstimateRequest())
    assert values == {name: option_field(name).default for name in grpc_field_names()}


def test_grpc_values_reach_the_engine_request() -> None:
    message = omnipose_pb2.EstimateRequest(
        image=b"jpeg", flip=False, min_keypoint_score=0.25, min_instance_score=0.5,
        max_persons=3, render=True, stream_id="cam-1", end_stream=True,
        boxes=omnipose_pb2.BoxList(boxes=[omnipose_pb2.Box(x=1, y=2, width=3, height=4),
                                          omnipose_pb2.Box(x=5, y=6, width=7, height=8,
                                                           score=0.5)]))
    request = to_image_request(message)
    assert (request.data, request.flip, request.min_keypoint_score, request.min_instance_score,
            request.max_persons, request.render, request.stream_id, request.end_stream) == (
        b"jpeg", False, 0.25, 0.5, 3, True, "cam-1", True)
    assert request.boxes == [[1, 2, 3, 4], [5, 6, 7, 8]] and request.box_scores == [1.0, 0.5]
    unset = to_image_request(omnipose_pb2.EstimateRequest(image=b"jpeg"))
    assert (unset.flip, unset.max_persons, unset.stream_id, unset.boxes) == (None,) * 4


# --- one range check for both transports -----------------------------------------------------
REFUSED = [
    ({"min_keypoint_score": 2.0}, "min_keypoint_score must be a number in [0, 1], got 2.0"),
    ({"min_instance_score": -0.5}, "min_instance_score must be a number in [0, 1], got -0.5"),
    ({"min_keypoint_score": math.nan}, "min_keypoint_score must be a number in [0, 1], got nan"),
    ({"max_persons": 0}, "max_persons must be at least 1, got 0"),
    ({"stream_id": "x" * 129}, "stream_id must be 1 to 128 printable characters"),
    ({"stream_id": "a\nb"}, "stream_id must be 1 to 128 printable characters, got 'a\\nb'"),
    ({"end_stream": True}, "end_stream needs the stream_id of the stream to end"),
    ({"box_scores": [0.5, 1.5]}, "box 1 score 1.5 is not in [0, 1]"),
]


@pytest.mark.parametrize(("values", "message"), REFUSED)
def test_out_of_range_options_are_the_clients_error(values: dict, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        ImageRequest(b"", **values).check()
    assert refused.value.message.startswith(message)
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT


def test_in_range_options_pass() -> None:
    ImageRequest(b"", min_keypoint_score=1, min_instance_score=0, max_persons=1,
                 stream_id="x" * 128, end_stream=True, box_scores=[0, 1]).check()
    RequestOptions().check()


# --- REST and docs ---------------------------------------------------------------------------
def _query_names(dependency) -> list[str]:
    return [p for p in inspect.signature(dependency).parameters if p != "request"]


def test_rest_query_parameters_are_the_options() -> None:
    assert _query_names(ONE_IMAGE_QUERY) == option_names()
    assert set(_query_names(BATCH_QUERY)) == set(option_names()) - {"render", "stream_id",
                                                                    "end_stream"}


def test_openapi_documents_every_options_range() -> None:
    from fastapi import FastAPI

    from omnipose.service.rest import router

    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/v1/pose"]["post"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["min_instance_score"]["schema"]["maximum"] == 1
    assert params["max_persons"]["schema"]["minimum"] == 1
    assert params["stream_id"]["schema"]["maxLength"] == 128
    assert params["image_id"]["schema"]["maxLength"] == 200
    for name in option_names():
        assert params[name]["description"] == option_field(name).description
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(form) == {"image", *option_names()}


def test_readme_option_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- options table:[^\n]*-->\n(.*?)<!-- end of options table -->",
                      readme, re.DOTALL)
    assert found, "README.md lost its options table markers"
    assert found.group(1) == options_table(), (
        "README's options table is stale: paste omnipose.service.options.options_table()")
