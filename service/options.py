"""The per-request options, declared once: :class:`RequestOptions`.

Each option is one field here with its type, default, range and description. Everything else
follows from the fields, so nothing else names an option:

* REST: the query parameters (a FastAPI dependency built from the fields, so OpenAPI documents
  them with their ranges), the multipart form fields that override them, and their parsing;
* gRPC: ``EstimateRequest`` -> options, field by field by name (:func:`options_from_message`);
  a field without presence in the .proto whose zero value is out of the option's range (0 for
  ``max_persons``, "" for ``stream_id``) means "not given";
* validation: :meth:`RequestOptions.check`, the one place the ranges are enforced for both
  transports (the engine calls it before admission), with the messages clients see;
* the engine: :class:`omnipose.service.requests.ImageRequest` is a RequestOptions with the image,
  so every option is an attribute of the request the pipeline reads;
* docs: README's option table is :func:`options_table` (a test keeps them equal).

Adding an option: a field here (type, default, description, a :class:`Between` or
:class:`PrintableText` range if it has one; :data:`REST_ONLY` when gRPC has no use for it), the
same-named field in ``EstimateRequest`` of proto/omnipose.proto (regenerate the stubs with
``python -m omnipose.proto.generate``; ``optional`` when the option's default is None and its zero
value is a valid setting), the pipeline code that acts on ``request.<name>``, and tests.
``tests/test_options.py`` fails until the .proto and README agree with this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import CoreSchema

from omnipose.service.errors import InvalidRequest

MAX_STREAM_ID_LENGTH = 128
MAX_IMAGE_ID_LENGTH = 200


# --- how an option is declared ---------------------------------------------------------------
class Rule:
    """A range an option's value must be in: documented in the JSON schema (OpenAPI) and
    enforced by :meth:`RequestOptions.check`. None (option not given) is always in range."""

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def problem(self, name: str, value: Any) -> str | None:
        """The client's message when ``value`` is out of range, else None."""
        raise NotImplementedError

    def text(self) -> str:
        """The range for people (README's table)."""
        raise NotImplementedError

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(core_schema), **self.schema()}


@dataclass(frozen=True)
class Between(Rule):
    """A number at least ``minimum`` (and at most ``maximum`` when given), finite."""

    minimum: int
    maximum: int | None = None

    def schema(self) -> dict[str, Any]:
        bounds = {"minimum": self.minimum}
        return bounds if self.maximum is None else {**bounds, "maximum": self.maximum}

    def problem(self, name: str, value: Any) -> str | None:
        if value is None:
            return None
        number = isinstance(value, int | float) and math.isfinite(value)
        if self.maximum is None:
            if number and value >= self.minimum:
                return None
            return f"{name} must be at least {self.minimum}, got {value!r}"
        if number and self.minimum <= value <= self.maximum:
            return None
        return f"{name} must be a number in [{self.minimum}, {self.maximum}], got {value!r}"

    def text(self) -> str:
        if self.maximum is None:
            return f"at least {self.minimum}"
        return f"{self.minimum} to {self.maximum}"


@dataclass(frozen=True)
class PrintableText(Rule):
    """A string of 1 to ``max_length`` printable characters."""

    max_length: int

    def schema(self) -> dict[str, Any]:
        return {"minLength": 1, "maxLength": self.max_length}

    def problem(self, name: str, value: Any) -> str | None:
        if value is None or (0 < len(value) <= self.max_length and value.isprintable()):
            return None
        return (f"{name} must be 1 to {self.max_length} printable characters,"
                f" got {value[:80]!r}")

    def text(self) -> str:
        return f"1 to {self.max_length} printable characters"


@dataclass(frozen=True)
class Transport:
    """How an option travels when it is not a same-named plain field on both transports:
    as the ``grpc_message`` message on gRPC (converted by the gRPC transport), or REST only
    (``grpc_message`` None)."""

    grpc_message: str | None
    why: str


REST_ONLY = Transport(None, "REST only: it names the image in REST's COCO annotations")
BOX_LIST = Transport("BoxList", "a BoxList message; its boxes may carry scores")

UNIT_INTERVAL = Between(0, 1)


# --- the options -----------------------------------------------------------------------------
class RequestOptions(BaseModel):
    """What a client may ask of one request besides the image, on either transport."""

    model_config = ConfigDict(extra="forbid")

    boxes: Annotated[str | None, BOX_LIST] = Field(
        None, description="JSON list of person boxes [[x, y, w, h], ...] in image pixels; when"
                          " given (even []), person detection is skipped")
    flip: bool | None = Field(None, description="Flip test; default: the service's setting")
    min_keypoint_score: Annotated[float, UNIT_INTERVAL] = Field(
        0.0, description="Keypoints below it are reported as 0, 0, 0")
    min_instance_score: Annotated[float, UNIT_INTERVAL] = Field(
        0.0, description="Drop persons scoring below it")
    min_box_score: Annotated[float, UNIT_INTERVAL] = Field(
        0.0, description="Drop persons whose box scored below it (the detector's score, or the"
                         " client's box score)")
    max_persons: Annotated[int | None, Between(1)] = Field(
        None, description="Keep the top-scoring persons; default and cap: the service's"
                          " max_persons")
    render: bool = Field(False, description="Return an image/jpeg overlay with the skeletons"
                                            " drawn instead of JSON")
    stream_id: Annotated[str | None, PrintableText(MAX_STREAM_ID_LENGTH)] = Field(
        None, description="Frames sent under one stream_id (chosen by the client) are one video"
                          " stream: persons carry track_id (docs/video.md)")
    end_stream: bool = Field(False, description="With stream_id: forget the stream after this"
                                                " frame")
    image_id: Annotated[str | None, REST_ONLY] = Field(
        None, max_length=MAX_IMAGE_ID_LENGTH, description="Echoed as image_id in the"
        " annotations; a number of up to 15 ASCII digits becomes an integer id")

    def check(self) -> None:
        """InvalidRequest for the first option out of its range (the one place ranges are
        enforced, for both transports; parsing has checked the types)."""
        for name in option_names():
            for rule in rules_of(name):
                message = rule.problem(name, getattr(self, name))
                if message is not None:
                    raise InvalidRequest(message)
        if self.end_stream and self.stream_id is None:
            raise InvalidRequest("end_stream needs the stream_id of the stream to end")


# --- reading the declarations ----------------------------------------------------------------
def option_names() -> list[str]:
    """Every option, in declaration order."""
    return list(RequestOptions.model_fields)


def option_field(name: str) -> FieldInfo:
    return RequestOptions.model_fields[name]


def rules_of(name: str) -> list[Rule]:
    return [m for m in option_field(name).metadata if isinstance(m, Rule)]


RANGE_KEYWORDS = ("minimum", "maximum", "minLength", "maxLength")


def range_schema(name: str) -> dict[str, Any]:
    """The option's range as JSON schema keywords (``minimum``, ``maxLength``, ...), for
    OpenAPI: its rules', and a length limit pydantic itself enforces (``image_id``)."""
    prop = RequestOptions.model_json_schema()["properties"][name]
    schema: dict[str, Any] = {}
    for part in [prop, *prop.get("anyOf", ())]:
        schema.update({key: part[key] for key in RANGE_KEYWORDS if key in part})
    return schema


def transport_of(name: str) -> Transport | None:
    """How the option travels, when not as a same-named plain field on both transports."""
    return next((m for m in option_field(name).metadata if isinstance(m, Transport)), None)


def grpc_field_names() -> list[str]:
    """Options that are plain same-named ``EstimateRequest`` fields."""
    return [name for name in option_names() if transport_of(name) is None]


def value_type(name: str) -> type:
    """The option's Python type without None (bool, int, float or str)."""
    annotation = option_field(name).annotation
    kinds = [t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None)]
    (kind,) = kinds
    return kind


def is_optional(name: str) -> bool:
    """Whether "not given" (None) is a value of its own: the service decides then."""
    return option_field(name).default is None


def options_from_message(message: Any) -> dict[str, Any]:
    """The plain options of a protobuf ``EstimateRequest``, by field name. An unset field with
    presence is None; so is a field without presence holding its zero value when the option is
    optional (the .proto documents the zero value as "the server's default")."""
    fields = message.DESCRIPTOR.fields_by_name
    values: dict[str, Any] = {}
    for name in grpc_field_names():
        descriptor = fields[name]
        if descriptor.has_presence:
            values[name] = getattr(message, name) if message.HasField(name) else None
            continue
        value = getattr(message, name)
        values[name] = None if is_optional(name) and value == descriptor.default_value else value
    return values


# --- docs ------------------------------------------------------------------------------------
def _range_text(name: str) -> str:
    texts = [rule.text() for rule in rules_of(name)]
    limit = range_schema(name).get("maxLength")
    if not texts and limit is not None:
        texts.append(f"at most {limit} characters")
    return ", ".join(texts)


def options_table() -> str:
    """README's markdown table of the options, generated from the declarations."""
    rows = ["| option | type | default | range | gRPC | what |", "|---|---|---|---|---|---|"]
    for name in option_names():
        field = option_field(name)
        transport = transport_of(name)
        grpc = "same field" if transport is None else transport.why
        default = "not given" if field.default is None else f"`{field.default!r}`"
        rows.append(f"| `{name}` | {value_type(name).__name__} | {default} | {_range_text(name)}"
                    f" | {grpc} | {field.description} |")
    return "\n".join(rows) + "\n"
