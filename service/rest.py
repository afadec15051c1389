"""The REST transport (FastAPI): parses HTTP into engine requests and engine answers into HTTP.

Thin on purpose: batching, deadlines, admission and every pipeline stage live in the engine, so
REST and gRPC behave the same. Every error, from any layer, is ``{"error": {"code", "message"}}``.
Every response carries an ``X-Request-Id`` header (the client's own, when it sent a sane one); an
unexpected failure answers only "internal error (request id ...)" and logs the details under it.
Request bodies are counted as they arrive, so a chunked upload (no Content-Length) cannot exceed
the limits either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnipose.service.admission import BudgetLease, SharedBudget
from omnipose.service.auth import KeyChecker, http_path_needs_key, load_key_digests, presented_key
from omnipose.service.boxes import BoxError, load_json
from omnipose.service.docs_ui import mount_docs
from omnipose.service.engine import PoseEngine
from omnipose.service.errors import (
    REQUEST_ID,
    EngineError,
    EngineOverloaded,
    ErrorCode,
    InvalidRequest,
    new_request_id,
    request_id_from,
    within_deadline,
)
from omnipose.service.http_server import InflightRequests, TransportGuard
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.requests import ImageRequest, ImageResult
from omnipose.service.schemas import (
    BatchPoseResponse,
    ErrorResponse,
    HealthResponse,
    ModelDescription,
    PoseOptions,
    PoseResponse,
    numeric_image_id,
)
from omnipose.service.tracking import TRACK_ID_KEY
from omnipose.service.uploads import (
    ClientDisconnected,
    body_too_large,
    declared_length,
    read_multipart,
    read_raw_body,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

HTTP_STATUS = {
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.INVALID_ARGUMENT: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.INTERNAL: 500,
}
CLIENT_CLOSED_REQUEST = 499  # nginx's convention: the client went away before the answer
MULTIPART_OVERHEAD_BYTES = 1024 * 1024  # form fields and part headers around the image bytes
TIMEOUT_HEADER = "X-Request-Timeout"
REQUEST_ID_HEADER = "X-Request-Id"
UNIT_INTERVAL_DOC = {"minimum": 0, "maximum": 1}  # documented here, enforced by the engine


def _error_doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


POSE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error_doc("The bytes are not a decodable image (empty, corrupt, truncated)"),
    413: _error_doc("The image (bytes or pixels) or the batch is over the service's limits"),
    415: _error_doc("Unsupported content type or image format (e.g. GIF)"),
    422: _error_doc("Invalid parameters (boxes, thresholds, timeout) or a missing image field"),
    429: _error_doc("The service is at capacity; retry after the Retry-After header's seconds"),
    499: _error_doc("Not sent: the client closed the connection first (recorded in metrics)"),
    500: _error_doc("Unexpected failure inside the service; the message and the X-Request-Id"
                    " header give the id under which the server logged the details"),
    503: _error_doc("The model is still loading/warming up, or the service is shutting down"),
    504: _error_doc("The request's deadline (X-Request-Timeout or the default) passed"),
}

def _request_body_doc(file_field: str, many: bool) -> dict:
    """OpenAPI for bodies the handlers parse themselves (multipart or a raw image)."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if many:
        file_schema = {"type": "array", "items": file_schema}
    form_fields: dict[str, Any] = {file_field: file_schema}
    for name, field in PoseOptions.model_fields.items():
        form_fields[name] = {"type": "string", "description": f"{field.description} (form field;"
                             " overrides the query parameter)"}
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": form_fields,
                                           "required": [file_field]}},
    }
    if not many:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


# --- errors ----------------------------------------------------------------------------------
def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def engine_error_response(error: EngineError) -> JSONResponse:
    headers = None
    if isinstance(error, EngineOverloaded):
        headers = {"Retry-After": str(error.retry_after_s)}
    return error_response(HTTP_STATUS.get(error.code, 500), str(error.code), error.message, headers)


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts)


def request_id_of(scope: Scope) -> str:
    """The id RequestContextMiddleware gave this request (a fresh one outside it)."""
    return scope.get("state", {}).get("request_id") or new_request_id()


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


# --- request context middleware --------------------------------------------------------------
class RequestContextMiddleware:
    """Per HTTP request: an id (``X-Request-Id`` on the response, ``REQUEST_ID`` for the engine
    and the logs), and a count by route template and status with its duration. Pure ASGI, so it
    does not buffer bodies or interfere with disconnect detection."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": CLIENT_CLOSED_REQUEST}
        request_id = request_id_from(_client_request_id(scope))
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        token = REQUEST_ID.set(request_id)

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status["code"] = 500
            raise
        finally:
            REQUEST_ID.reset(token)
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels("http", endpoint, str(status["code"])).inc()
            self.metrics.request_latency.labels("http", endpoint).observe(
                time.perf_counter() - started)


# --- authentication --------------------------------------------------------------------------
class ApiKeyMiddleware:
    """401 for requests without an accepted API key (``Authorization: Bearer`` or
    ``X-API-Key``), except health, readiness and what the settings leave open. Pure ASGI: the
    refusal comes before any of the body is read."""

    def __init__(self, app: ASGIApp, checker: KeyChecker, settings: Any) -> None:
        self.app = app
        self.checker = checker
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not http_path_needs_key(
                scope["path"], self.settings.metrics_access, self.settings.docs_access):
            await self.app(scope, receive, send)
            return
        headers = {name: value.decode("latin-1") for name, value in scope.get("headers", ())
                   if name in (b"authorization", b"x-api-key")}
        key = presented_key(headers.get(b"authorization"), headers.get(b"x-api-key"))
        if self.checker.accepts(key):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "unauthenticated", "a valid API key is required: send 'Authorization: Bearer"
            " <key>' or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


# --- request parsing -------------------------------------------------------------------------
def _merge_options(query: dict[str, Any], fields: list[tuple[str, str]] | None) -> PoseOptions:
    """Query parameters, overridden by same-named form fields; unknown form fields are errors."""
    values = {k: v for k, v in query.items() if v is not None}
    for key, value in fields or ():
        values[key] = value
    try:
        return PoseOptions.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc.errors())) from None


def _reject_unknown_query(request: Request, known: dict[str, Any]) -> None:
    """Unknown query parameters are errors, as unknown form fields are: a misspelt option
    (``min_keypoint_scor``) must not be silently ignored."""
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))};"
                             f" known: {', '.join(sorted(known))}")


def _image_id(options: PoseOptions) -> int | str:
    """A numeric image_id is a COCO integer id; anything else is echoed as a string."""
    if options.image_id is None:
        return 0
    number = numeric_image_id(options.image_id)
    return options.image_id if number is None else number


def _to_request(data: bytes, options: PoseOptions, boxes: Any = None) -> ImageRequest:
    """Boxes go to the engine as sent; it checks them once the image size is known."""
    return ImageRequest(
        data=data, boxes=boxes, flip=options.flip,
        min_keypoint_score=options.min_keypoint_score,
        min_instance_score=options.min_instance_score,
        max_persons=options.max_persons, render=options.render,
        stream_id=options.stream_id, end_stream=options.end_stream,
    )


def _timeout(header_value: float | None) -> float | None:
    if header_value is not None and not header_value > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds,"
                             f" got {header_value!r}")
    return header_value


async def _received_by(deadline: float, reading: Awaitable[T]) -> T:
    """``reading`` (of the request body) done before the request's deadline: the deadline runs
    from admission, so a client that uploads slowly gives its admission slot back at its own
    deadline instead of holding it until the HTTP layer's timeouts."""
    return await within_deadline(deadline, reading, "while its body was still being received")


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work``; if the client goes away first, cancel it (freeing its queued work)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        return False, None
    return True, task.result()


# --- app -------------------------------------------------------------------------------------
def create_app(engine: PoseEngine, metrics: ServiceMetrics | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; ``metrics`` defaults to the engine's."""
    metrics = metrics or engine.metrics
    settings = engine.settings
    docs = settings.docs_access != "off"
    app = FastAPI(
        docs_url=None, redoc_url=None,  # served from local assets by mount_docs below
        openapi_url="/openapi.json" if docs else None,
        title="OmniPose Serve",
        version="1.0",
        description="Multi-person 2D human pose estimation (OmniPose: HRNet + WASPv2), "
                    "dynamically batched. Keypoints follow the COCO results format. Images are "
                    "turned upright as their EXIF orientation tag says (phone photos) unless "
                    "the service's exif_orientation setting is off: client boxes, returned "
                    "boxes and keypoints, and image width/height all refer to the upright image.",
    )
    # Inside RequestContextMiddleware (added last, so outermost): the guard's answers get a
    # request id and are counted like any other.
    checker = KeyChecker(load_key_digests(settings.api_key_sha256, settings.api_keys_file))
    if checker.enabled:  # before anything reads a body: a request without a key costs nothing
        app.add_middleware(ApiKeyMiddleware, checker=checker, settings=settings)
    app.state.inflight = InflightRequests()
    app.add_middleware(TransportGuard, inflight=app.state.inflight)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    mount_docs(app)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Runs outside RequestContextMiddleware (Starlette's outermost layer): add the id here.
        request_id = request_id_of(request.scope)
        log.error("unexpected error on %s %s (request id %s)", request.method, request.url.path,
                  request_id, exc_info=exc)
        return error_response(500, str(ErrorCode.INTERNAL),
                              f"internal error (request id {request_id})",
                              {REQUEST_ID_HEADER: request_id})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, str(ErrorCode.INVALID_ARGUMENT),
                              _validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    body_budget = SharedBudget("bytes of request bodies", settings.max_inflight_body_bytes,
                               metrics.inflight_body_bytes.set, engine.admission.retry_after_s)

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @contextlib.asynccontextmanager
    async def admitted(request: Request,
                       body_limit: int) -> AsyncIterator[tuple[BudgetLease, BudgetLease]]:
        """Admission before bytes: a body declared over ``body_limit`` (413), a full queue
        (429), a draining or loading engine (503) and a full body budget (429) are all refused
        before a byte of the body is read."""
        length = declared_length(request.scope["headers"])
        if length is not None and length > body_limit:
            raise body_too_large(body_limit, length)
        with engine.admit() as lease, body_budget.lease() as body:
            body_budget.take(body, length or 0)
            yield lease, body

    def model_ref() -> dict[str, str]:
        model = engine.pose_model
        return {"name": model.name, "version": model.version}

    def to_json(result: ImageResult, image_id: int | str) -> dict[str, Any]:
        spec = engine.pose_model.keypoints
        persons = []
        for person in result.persons:
            annotation = person.to_coco(image_id, spec)
            if TRACK_ID_KEY in person.extras:  # an addition: COCO's fields stay as they are
                annotation["track_id"] = person.extras[TRACK_ID_KEY]
            persons.append(annotation)
        body = {
            "image": {"width": result.width, "height": result.height},
            "model": model_ref(),
            "persons": persons,
            "timings_ms": result.timings_ms,
        }
        if result.detector_ran is not None:
            body["detector_ran"] = result.detector_ran
        return body

    async def answer(request: Request, work: Awaitable[Any],
                     build: Callable[[Any], Response]) -> Response:
        completed, value = await _unless_disconnected(request, work)
        if not completed:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return build(value)

    @app.post(
        "/v1/pose",
        response_model=PoseResponse,
        responses={200: {"content": {"image/jpeg": {"schema": {"type": "string",
                                                               "format": "binary"}}},
                         "description": "Persons found (JSON), or the overlay when render=true"},
                   **POSE_ERRORS},
        openapi_extra=_request_body_doc("image", many=False),
        summary="Estimate the poses of every person in one image",
    )
    async def estimate_pose(
        request: Request,
        boxes: str | None = Query(None, description=PoseOptions.model_fields["boxes"].description),
        flip: bool | None = Query(None, description="Flip test; default: the service's setting"),
        min_keypoint_score: float | None = Query(None, json_schema_extra=UNIT_INTERVAL_DOC,
                                                 description="Keypoints below it become 0, 0, 0"),
        min_instance_score: float | None = Query(None, json_schema_extra=UNIT_INTERVAL_DOC,
                                                 description="Drop persons scoring below it"),
        max_persons: int | None = Query(None, json_schema_extra={"minimum": 1},
                                        description="Keep the top-scoring persons"),
        render: bool | None = Query(None, description="Return image/jpeg with skeletons drawn"),
        image_id: str | None = Query(None, description="image_id of the returned annotations"),
        stream_id: str | None = Query(
            None, description=PoseOptions.model_fields["stream_id"].description),
        end_stream: bool | None = Query(
            None, description=PoseOptions.model_fields["end_stream"].description),
        request_timeout: float | None = Header(
            None, alias=TIMEOUT_HEADER, description="Deadline in seconds (capped by the server)"),
    ) -> Response:
        query = {"boxes": boxes, "flip": flip, "min_keypoint_score": min_keypoint_score,
                 "min_instance_score": min_instance_score, "max_persons": max_persons,
                 "render": render, "image_id": image_id, "stream_id": stream_id,
                 "end_stream": end_stream}
        _reject_unknown_query(request, query)
        timeout = _timeout(request_timeout)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = content_type == "multipart/form-data"
        if not (multipart or content_type.startswith("image/")):
            raise InvalidRequest(
                f"unsupported content type {content_type or '(none)'!r}: send the image as"
                " multipart/form-data field 'image' or as a raw body with an image/* type",
                ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            )
        body_limit = settings.max_image_bytes + (MULTIPART_OVERHEAD_BYTES if multipart else 0)
        async with admitted(request, body_limit) as (lease, body):
            deadline = engine.deadline_from(timeout)
            if multipart:
                one_file = InvalidRequest("the multipart body must hold exactly one file, the"
                                          " 'image' field; use /v1/pose/batch for several images")
                form = await _received_by(deadline, read_multipart(
                    request.receive, request.headers["content-type"], body, body_budget,
                    body_limit, file_field="image", max_files=1,
                    file_limit=settings.max_image_bytes, too_many_files=one_file))
                if not form.files:
                    raise InvalidRequest("the multipart body has no 'image' file field")
                data = form.files[0][1]
                options = _merge_options(query, form.fields)
            else:
                data = await _received_by(deadline, read_raw_body(
                    request.receive, body, body_budget, settings.max_image_bytes))
                options = _merge_options(query, None)
            image_request = _to_request(data, options, options.boxes)
            image_id = _image_id(options)

            def build(result: ImageResult) -> Response:
                if options.render:
                    return Response(result.rendered_jpeg, media_type="image/jpeg",
                                    headers={"X-Persons": str(len(result.persons))})
                return JSONResponse(to_json(result, image_id))

            return await answer(
                request, engine.estimate(image_request, admitted=lease, deadline=deadline), build)

    @app.post(
        "/v1/pose/batch",
        response_model=BatchPoseResponse,
        responses=POSE_ERRORS,
        openapi_extra=_request_body_doc("images", many=True),
        summary="Estimate poses in several images (multipart field 'images', repeated)",
    )
    async def estimate_pose_batch(
        request: Request,
        boxes: str | None = Query(
            None, description="JSON list with one entry per image: a box list [[x, y, w, h],"
                              " ...] or null to detect people in that image"),
        flip: bool | None = Query(None, description="Flip test; default: the service's setting"),
        min_keypoint_score: float | None = Query(None, json_schema_extra=UNIT_INTERVAL_DOC),
        min_instance_score: float | None = Query(None, json_schema_extra=UNIT_INTERVAL_DOC),
        max_persons: int | None = Query(None, json_schema_extra={"minimum": 1}),
        image_id: str | None = Query(
            None, description="image_id of the first image; the others count up from it when"
                              " it is a number"),
        request_timeout: float | None = Header(None, alias=TIMEOUT_HEADER),
    ) -> Response:
        query = {"boxes": boxes, "flip": flip, "min_keypoint_score": min_keypoint_score,
                 "min_instance_score": min_instance_score, "max_persons": max_persons,
                 "image_id": image_id}
        _reject_unknown_query(request, query)
        timeout = _timeout(request_timeout)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            raise InvalidRequest(
                f"unsupported content type {content_type or '(none)'!r}: send the images as"
                " multipart/form-data fields named 'images'", ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            )
        limit = settings.max_images_per_batch
        too_many = InvalidRequest(f"more than {limit} images in one batch, over the limit of"
                                  f" {limit}", ErrorCode.PAYLOAD_TOO_LARGE)
        body_limit = limit * settings.max_image_bytes + MULTIPART_OVERHEAD_BYTES
        async with admitted(request, body_limit) as (lease, body):
            deadline = engine.deadline_from(timeout)
            form = await _received_by(deadline, read_multipart(
                request.receive, request.headers["content-type"], body, body_budget, body_limit,
                file_field="images", max_files=limit, file_limit=settings.max_image_bytes,
                too_many_files=too_many))
            uploads = [data for _, data in form.files]
            if not uploads:
                raise InvalidRequest("the multipart body has no 'images' file fields")
            options = _merge_options(query, form.fields)
            if options.render:
                raise InvalidRequest("render is only available on /v1/pose (one image)")
            per_image_boxes: list[Any] = [None] * len(uploads)
            if options.boxes is not None:
                try:
                    per_image_boxes = load_json(options.boxes)
                except BoxError as exc:
                    raise InvalidRequest(str(exc)) from None
                if not isinstance(per_image_boxes, list) or len(per_image_boxes) != len(uploads):
                    raise InvalidRequest(f"boxes must be a JSON list with one entry (a box list"
                                         f" or null) per image: {len(uploads)} entries")
            requests = [_to_request(data, options, image_boxes)
                        for data, image_boxes in zip(uploads, per_image_boxes, strict=True)]
            first_id = _image_id(options)

            def build(results: list[ImageResult]) -> Response:
                ids = [first_id + i if isinstance(first_id, int) else first_id
                       for i in range(len(results))]
                return JSONResponse({"results": [to_json(r, i) for r, i in zip(results, ids,
                                                                               strict=True)]})

            return await answer(
                request, engine.estimate_many(requests, admitted=lease, deadline=deadline), build)

    @app.get("/v1/models", response_model=ModelDescription,
             responses={503: _error_doc("The model is still loading")},
             summary="The loaded pose model: config, joints, skeleton, input size, checksum")
    async def get_model() -> dict:
        return engine.describe()

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=HealthResponse,
             responses={503: _error_doc("Not ready: loading, warming up, or shutting down")},
             summary="Readiness: model and detector loaded and warmed, not shutting down")
    async def readyz() -> Response:
        if engine.ready:
            return JSONResponse({"status": "ready"})
        return error_response(503, str(ErrorCode.UNAVAILABLE), f"not ready: {engine.state}")

    if settings.metrics_access != "off":
        text = {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}

        @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text format)",
                 responses={200: text})
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
