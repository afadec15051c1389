"""The REST transport (FastAPI): parses HTTP into engine requests and engine answers into HTTP.

Thin on purpose: batching, deadlines, admission and every pipeline stage live in the engine, so
REST and gRPC behave the same. The handlers are module-level FastAPI routes; what they share
(engine, settings, metrics, body budget) comes from ``app.state`` through dependencies, and the
options' query parameters from :class:`omnipose.service.options.RequestOptions`. Errors and
request ids are :mod:`omnipose.service.rest_errors`' job. Request bodies are counted as they
arrive, so a chunked upload (no Content-Length) cannot exceed the limits either.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from omnipose.service.admission import BudgetLease, SharedBudget
from omnipose.service.auth import KeyChecker, load_key_digests
from omnipose.service.docs_ui import mount_docs
from omnipose.service.engine import PoseEngine
from omnipose.service.errors import ErrorCode, InvalidRequest, within_deadline
from omnipose.service.http_server import DRAIN_TIMEOUT_S, InflightRequests, TransportGuard
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.options import (
    RequestOptions,
    option_field,
    option_names,
    range_schema,
    value_type,
)
from omnipose.service.requests import ImageRequest, ImageResult, boxes_per_image
from omnipose.service.rest_errors import (
    CLIENT_CLOSED_REQUEST,
    EXCEPTION_HANDLERS,
    ApiKeyMiddleware,
    RequestContextMiddleware,
    error_response,
    validation_message,
)
from omnipose.service.schemas import (
    BatchPoseResponse,
    ErrorResponse,
    HealthResponse,
    ModelDescription,
    PoseResponse,
    numeric_image_id,
)
from omnipose.service.settings import ServiceSettings
from omnipose.service.uploads import (
    BodyPace,
    body_too_large,
    check_declared_type,
    declared_length,
    read_multipart,
    read_raw_body,
)

T = TypeVar("T")

MULTIPART_OVERHEAD_BYTES = 1024 * 1024  # form fields and part headers around the image bytes
TIMEOUT_HEADER = "X-Request-Timeout"


def _error_doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


POSE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error_doc("The bytes are not a decodable image (empty, corrupt, truncated)"),
    408: _error_doc("The request body stalled or arrived slower than the minimum rate"),
    413: _error_doc("The image (bytes or pixels) or the batch is over the service's limits"),
    415: _error_doc("Unsupported content type or image format (e.g. GIF), or a raw body whose"
                    " Content-Type names another format than its bytes"),
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
    for name in option_names():
        form_fields[name] = {"type": "string", "description": f"{option_field(name).description}"
                             " (form field; overrides the query parameter)"}
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": form_fields,
                                           "required": [file_field]}},
    }
    if not many:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


# --- request parsing -------------------------------------------------------------------------
def options_query(exclude: frozenset[str] = frozenset(),
                  descriptions: dict[str, str] | None = None
                  ) -> Callable[..., Awaitable[dict[str, Any]]]:
    """A FastAPI dependency: the query parameters of every option (but ``exclude``), typed and
    documented from :class:`RequestOptions`; returns those given. Unknown query parameters are
    errors, as unknown form fields are: a misspelt option (``min_keypoint_scor``) must not be
    silently ignored."""
    descriptions = descriptions or {}
    parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=Request)]
    for name in option_names():
        if name in exclude:
            continue
        query = Query(None, description=descriptions.get(name, option_field(name).description),
                      json_schema_extra=range_schema(name) or None)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=query,
                                            annotation=value_type(name) | None))
    known = [p.name for p in parameters[1:]]

    async def given(request: Request, **values: Any) -> dict[str, Any]:  # no thread hop
        unknown = sorted(set(request.query_params) - set(known))
        if unknown:
            raise InvalidRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))};"
                                 f" known: {', '.join(sorted(known))}")
        return {name: value for name, value in values.items() if value is not None}

    given.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return given


ONE_IMAGE_QUERY = options_query()
BATCH_QUERY = options_query(
    exclude=frozenset({"render", "stream_id", "end_stream"}),  # one image (or stream) each
    descriptions={
        "boxes": "JSON list with one entry per image: a box list [[x, y, w, h], ...] or null to"
                 " detect people in that image",
        "image_id": "image_id of the first image; the others count up from it when it is a"
                    " number",
    })


def _merge_options(query: dict[str, Any], fields: list[tuple[str, str]] | None) -> RequestOptions:
    """Query parameters, overridden by same-named form fields; unknown form fields are errors."""
    values = dict(query)
    for key, value in fields or ():
        values[key] = value
    try:
        return RequestOptions.model_validate(values)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc.errors())) from None


def _image_id(options: RequestOptions) -> int | str:
    """A numeric image_id is a COCO integer id; anything else is echoed as a string."""
    if options.image_id is None:
        return 0
    number = numeric_image_id(options.image_id)
    return options.image_id if number is None else number


def _to_request(data: bytes, options: RequestOptions, boxes: Any) -> ImageRequest:
    """Boxes go to the engine as sent; it checks them once the image size is known."""
    return ImageRequest(data, **{**options.model_dump(), "boxes": boxes})


def _timeout(header_value: float | None) -> float | None:
    if header_value is not None and not header_value > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds,"
                             f" got {header_value!r}")
    return header_value


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


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


async def _answer(request: Request, work: Awaitable[Any],
                  build: Callable[[Any], Response]) -> Response:
    completed, value = await _unless_disconnected(request, work)
    if not completed:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return build(value)


# --- what the handlers share (FastAPI dependencies over app.state) ---------------------------
# Every dependency is a coroutine function: FastAPI runs a plain ``def`` dependency on its
# thread pool, a thread hop each (five per pose request) for what is an attribute lookup.
async def _engine(request: Request) -> PoseEngine:
    return request.app.state.engine


async def _settings(request: Request) -> ServiceSettings:
    return request.app.state.engine.settings


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def _body_budget(request: Request) -> SharedBudget:
    return request.app.state.body_budget


Engine = Annotated[PoseEngine, Depends(_engine)]
Settings = Annotated[ServiceSettings, Depends(_settings)]
Metrics = Annotated[ServiceMetrics, Depends(_metrics)]
BodyBudget = Annotated[SharedBudget, Depends(_body_budget)]
RequestTimeout = Annotated[float | None, Header(
    alias=TIMEOUT_HEADER, description="Deadline in seconds (capped by the server)")]


@contextlib.asynccontextmanager
async def _receiving(request: Request, engine: PoseEngine, body_budget: SharedBudget,
                     body_limit: int, timeout: float | None) -> AsyncIterator[BudgetLease]:
    """Refusals before bytes: a body declared over ``body_limit`` (413), a full queue (429), a
    draining or loading engine (503) and a full body budget (429) are all refused before a byte
    of the body is read. The body is then received holding its budget bytes but no engine slot
    (see :func:`_admit_received`), so slow uploads cannot starve fast clients of the queue."""
    length = declared_length(request.scope["headers"])
    if length is not None and length > body_limit:
        raise body_too_large(body_limit, length)
    engine.check_admissible()
    with body_budget.lease() as body:
        body_budget.take(body, length or 0)
        yield body


def _body_pace(settings: ServiceSettings) -> BodyPace:
    return BodyPace(settings.http_body_idle_timeout_s, settings.http_body_min_rate_bytes_s)


def _admit_received(engine: PoseEngine, deadline: float) -> contextlib.AbstractContextManager:
    """The engine slot, taken once the body is in; the request's deadline ran from arrival."""
    return engine.admit(deadline=deadline)


def _to_json(engine: PoseEngine, result: ImageResult, image_id: int | str) -> dict[str, Any]:
    model = engine.pose_model
    persons = []
    for person in result.persons:
        annotation = person.to_coco(image_id, model.keypoints)
        if person.track_id is not None:  # an addition: COCO's fields stay as they are
            annotation["track_id"] = person.track_id
        persons.append(annotation)
    body = {
        "image": {"width": result.width, "height": result.height},
        "model": {"name": model.name, "version": model.version},
        "persons": persons,
        "timings_ms": result.timings_ms,
    }
    if result.detector_ran is not None:
        body["detector_ran"] = result.detector_ran
    return body


# --- endpoints -------------------------------------------------------------------------------
router = APIRouter()


@router.post(
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
    request: Request, engine: Engine, settings: Settings, body_budget: BodyBudget,
    query: Annotated[dict[str, Any], Depends(ONE_IMAGE_QUERY)],
    request_timeout: RequestTimeout = None,
) -> Response:
    timeout = _timeout(request_timeout)
    content_type = _content_type(request)
    multipart = content_type == "multipart/form-data"
    if not (multipart or content_type.startswith("image/")):
        raise InvalidRequest(
            f"unsupported content type {content_type or '(none)'!r}: send the image as"
            " multipart/form-data field 'image' or as a raw body with an image/* type",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    body_limit = settings.max_image_bytes + (MULTIPART_OVERHEAD_BYTES if multipart else 0)
    deadline = engine.deadline_from(timeout)
    pace = _body_pace(settings)
    async with _receiving(request, engine, body_budget, body_limit, timeout) as body:
        if multipart:
            one_file = InvalidRequest("the multipart body must hold exactly one file, the"
                                      " 'image' field; use /v1/pose/batch for several images")
            form = await _received_by(deadline, read_multipart(
                request.receive, request.headers["content-type"], body, body_budget,
                body_limit, file_field="image", max_files=1,
                file_limit=settings.max_image_bytes, too_many_files=one_file, pace=pace))
            if not form.files:
                raise InvalidRequest("the multipart body has no 'image' file field")
            data = form.files[0][1]
            options = _merge_options(query, form.fields)
        else:
            data = await _received_by(deadline, read_raw_body(
                request.receive, body, body_budget, settings.max_image_bytes, pace=pace))
            options = _merge_options(query, None)
            check_declared_type(content_type, data)
        image_request = _to_request(data, options, options.boxes)
        image_id = _image_id(options)

        def build(result: ImageResult) -> Response:
            if options.render:
                return Response(result.rendered_jpeg, media_type="image/jpeg",
                                headers={"X-Persons": str(len(result.persons))})
            return JSONResponse(_to_json(engine, result, image_id))

        with _admit_received(engine, deadline) as admitted:
            return await _answer(request, admitted.estimate(image_request), build)


@router.post(
    "/v1/pose/batch",
    response_model=BatchPoseResponse,
    responses=POSE_ERRORS,
    openapi_extra=_request_body_doc("images", many=True),
    summary="Estimate poses in several images (multipart field 'images', repeated)",
)
async def estimate_pose_batch(
    request: Request, engine: Engine, settings: Settings, body_budget: BodyBudget,
    query: Annotated[dict[str, Any], Depends(BATCH_QUERY)],
    request_timeout: RequestTimeout = None,
) -> Response:
    timeout = _timeout(request_timeout)
    content_type = _content_type(request)
    if content_type != "multipart/form-data":
        raise InvalidRequest(
            f"unsupported content type {content_type or '(none)'!r}: send the images as"
            " multipart/form-data fields named 'images'", ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    limit = settings.max_images_per_batch
    too_many = InvalidRequest(f"more than {limit} images in one batch, over the limit of"
                              f" {limit}", ErrorCode.PAYLOAD_TOO_LARGE)
    body_limit = limit * settings.max_image_bytes + MULTIPART_OVERHEAD_BYTES
    deadline = engine.deadline_from(timeout)
    async with _receiving(request, engine, body_budget, body_limit, timeout) as body:
        form = await _received_by(deadline, read_multipart(
            request.receive, request.headers["content-type"], body, body_budget, body_limit,
            file_field="images", max_files=limit, file_limit=settings.max_image_bytes,
            too_many_files=too_many, pace=_body_pace(settings)))
        uploads = [data for _, data in form.files]
        if not uploads:
            raise InvalidRequest("the multipart body has no 'images' file fields")
        options = _merge_options(query, form.fields)
        if options.render:
            raise InvalidRequest("render is only available on /v1/pose (one image)")
        per_image_boxes: list[Any] = [None] * len(uploads)
        if options.boxes is not None:
            per_image_boxes = boxes_per_image(options.boxes, len(uploads))
        requests = [_to_request(data, options, image_boxes)
                    for data, image_boxes in zip(uploads, per_image_boxes, strict=True)]
        first_id = _image_id(options)

        def build(results: list[ImageResult]) -> Response:
            ids = [first_id + i if isinstance(first_id, int) else first_id
                   for i in range(len(results))]
            return JSONResponse({"results": [_to_json(engine, r, i)
                                             for r, i in zip(results, ids, strict=True)]})

        with _admit_received(engine, deadline) as admitted:
            return await _answer(request, admitted.estimate_many(requests), build)


@router.get("/v1/models", response_model=ModelDescription,
            responses={503: _error_doc("The model is still loading")},
            summary="The loaded pose model: config, joints, skeleton, input size, checksum")
async def get_model(engine: Engine) -> dict:
    return engine.describe()


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=HealthResponse,
            responses={503: _error_doc("Not ready: loading, warming up, or shutting down")},
            summary="Readiness: model and detector loaded and warmed, not shutting down")
async def readyz(engine: Engine) -> Response:
    if engine.ready:
        return JSONResponse({"status": "ready"})
    return error_response(503, str(ErrorCode.UNAVAILABLE), f"not ready: {engine.state}")


metrics_router = APIRouter()  # included unless the metrics_access setting is off


@metrics_router.get("/metrics", response_class=Response,
                    summary="Prometheus metrics (text format)",
                    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {
                        "type": "string"}}}}})
async def prometheus_metrics(metrics: Metrics) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- app -------------------------------------------------------------------------------------
def create_app(engine: PoseEngine, metrics: ServiceMetrics | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; ``metrics`` defaults to the engine's. The handlers read
    the engine, its settings, the metrics and the body budget from ``app.state``."""
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
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.body_budget = engine.admission.body_bytes  # shared with gRPC messages
    app.state.inflight = InflightRequests()
    # Inside RequestContextMiddleware (added last, so outermost): the guard's answers get a
    # request id and are counted like any other.
    checker = KeyChecker(load_key_digests(settings.api_key_sha256, settings.api_keys_file))
    if checker.enabled:  # before anything reads a body: a request without a key costs nothing
        app.add_middleware(ApiKeyMiddleware, checker=checker, settings=settings)
    app.add_middleware(TransportGuard, inflight=app.state.inflight,
                       drain_timeout_s=min(DRAIN_TIMEOUT_S, settings.http_body_idle_timeout_s))
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    mount_docs(app)
    app.include_router(router)
    if settings.metrics_access != "off":
        app.include_router(metrics_router)
    return app
