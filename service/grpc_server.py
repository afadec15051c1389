"""The gRPC transport (grpc.aio): omnipose.v1.PoseEstimation, standard health and reflection.

Thin like the REST one: it converts protobuf messages to engine requests and engine errors to
gRPC status codes. Message sizes are capped explicitly (``grpc_max_message_bytes``, both ways);
a larger message is refused by gRPC itself with RESOURCE_EXHAUSTED. Every call gets a request id
(the client's ``x-request-id`` metadata when tame), returned as trailing metadata; an unexpected
failure answers only "internal error (request id ...)" and logs the details under that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc
from omnipose.service.auth import GrpcKeyInterceptor, KeyChecker, load_key_digests
from omnipose.service.engine import PoseEngine
from omnipose.service.errors import (
    REQUEST_ID,
    EngineError,
    EngineOverloaded,
    ErrorCode,
    InvalidRequest,
    internal_error,
    request_id_from,
    within_deadline,
)
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.options import options_from_message
from omnipose.service.requests import ImageRequest, ImageResult
from omnipose.service.settings import ServiceSettings
from omnipose.service.tracking import TrackedStream

log = logging.getLogger(__name__)

T = TypeVar("T")
DEADLINE_SLACK_S = 0.05

SERVICE_NAME = omnipose_pb2.DESCRIPTOR.services_by_name["PoseEstimation"].full_name
GRPC_STATUS = {
    ErrorCode.INVALID_IMAGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    # An image over the size or pixel limits is the request's fault, and retrying cannot help:
    # RESOURCE_EXHAUSTED is kept for overload, which a retry later can get through.
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.REQUEST_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
RETRY_AFTER_KEY = "retry-after"
MESSAGE_OVERHEAD_BYTES = 1024 * 1024  # an image's options and boxes around its bytes
# A received message is in memory several times over while its call runs: gRPC core's slices,
# the bytes handed to Python, the parsed message and the image bytes taken from it. Reserved
# against the byte budget at this multiple of its size (measured: about 4x at peak).
MESSAGE_COPIES = 3
REQUEST_ID_KEY = "x-request-id"


# --- conversions -----------------------------------------------------------------------------
def to_image_request(message: omnipose_pb2.EstimateRequest) -> ImageRequest:
    """Protobuf request -> engine request: the options field by field (options_from_message),
    the boxes from their BoxList; the engine checks both as it does REST's."""
    boxes = scores = None
    if message.HasField("boxes"):
        listed = message.boxes.boxes
        boxes = [[b.x, b.y, b.width, b.height] for b in listed]
        scores = [b.score if b.HasField("score") else 1.0 for b in listed]
    return ImageRequest(message.image, boxes=boxes, box_scores=scores,
                        **options_from_message(message))


def to_response(result: ImageResult, engine: PoseEngine) -> omnipose_pb2.EstimateResponse:
    model = engine.pose_model
    joint_names = model.keypoints.joint_names
    persons = []
    for person in result.persons:
        x, y, w, h = (float(v) for v in person.bbox)
        keypoints = [omnipose_pb2.Keypoint(name=name, x=kx, y=ky, score=kc)
                     for name, (kx, ky, kc) in zip(joint_names, person.keypoints.tolist(),
                                                    strict=True)]
        persons.append(omnipose_pb2.Person(
            bbox=omnipose_pb2.Box(x=x, y=y, width=w, height=h, score=person.box_score),
            score=person.score, keypoints=keypoints, track_id=person.track_id,
        ))
    return omnipose_pb2.EstimateResponse(
        width=result.width, height=result.height,
        model=omnipose_pb2.ModelRef(name=model.name, version=model.version),
        persons=persons, timings_ms=result.timings_ms, rendered_jpeg=result.rendered_jpeg or b"",
        detector_ran=result.detector_ran,
    )


def to_model_description(description: dict) -> omnipose_pb2.ModelDescription:
    keypoints = description["keypoints"]
    config = description["config"]

    def pairs(items: list) -> list[omnipose_pb2.JointPair]:
        return [omnipose_pb2.JointPair(first=a, second=b) for a, b in items]

    return omnipose_pb2.ModelDescription(
        name=description["name"], version=description["version"], config=config["name"],
        dataset=config["dataset"], width=config["width"],
        input_height=description["input_size"][0], input_width=description["input_size"][1],
        heatmap_height=description["heatmap_size"][0],
        heatmap_width=description["heatmap_size"][1],
        joint_names=keypoints["joint_names"], flip_pairs=pairs(keypoints["flip_pairs"]),
        limbs=pairs(keypoints["limbs"]), sigmas=keypoints["sigmas"],
        weights_sha256=description["weights_sha256"] or "", trained=description["trained"],
        device=description["device"], precision=description["precision"],
        flip_test=description["flip_test"], detector=description["detector"],
        max_batch_size=description["max_batch_size"], backend=description["backend"],
        backend_choice=_backend_choice(description.get("backend_choice")),
    )


def _backend_choice(choice: dict | None) -> omnipose_pb2.BackendChoice | None:
    if choice is None:
        return None
    return omnipose_pb2.BackendChoice(
        backend=choice["backend"], precision=choice["precision"], source=choice["source"],
        probe=choice["probe"], measured_at=choice["measured_at"],
        candidates=[
            omnipose_pb2.BackendMeasurement(**{k: v for k, v in row.items() if v is not None})
            for row in choice["candidates"]
        ],
    )


def _call_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return request_id_from(value)
    return request_id_from(None)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The client's remaining deadline (grpc-timeout), if it set one; the engine caps it."""
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 1e-3)


def _cancellation_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled the handler: the call's deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    # gRPC core cancels a call at its deadline a little before time_remaining() reaches 0.
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def parse_message(message_type: type[T], data: bytes) -> T:
    """Our own deserialisation, so bytes that are not a valid ``message_type`` are the client's
    INVALID_ARGUMENT with a clean message (grpc's would be UNKNOWN with a Python traceback)."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise InvalidRequest(
            f"the request is not a valid {message_type.DESCRIPTOR.full_name} message"
            " (malformed protobuf)") from None


def pose_service_handler(service: PoseEstimationService) -> grpc.GenericRpcHandler:
    """The PoseEstimation methods with raw-bytes requests parsed by :func:`parse_message`."""
    methods = omnipose_pb2.DESCRIPTOR.services_by_name["PoseEstimation"].methods_by_name

    def response_serializer(message: Message) -> bytes:
        return message.SerializeToString()

    def unary(name: str) -> grpc.RpcMethodHandler:
        request_type = GetMessageClass(methods[name].input_type)
        implementation = getattr(service, name)

        async def handler(data: bytes, context: grpc.aio.ServicerContext) -> Message:
            try:
                request = parse_message(request_type, data)
            except InvalidRequest as exc:
                service.record_refused(name, exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            return await implementation(request, context)

        return grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=response_serializer)

    def received_under_budget(name: str) -> grpc.RpcMethodHandler:
        """A unary method served as stream-unary: the wire is the same (one message, then the
        client's half-close), but grpcio hands the handler an iterator instead of the message
        already received, so the call is admitted and its bytes reserved before it is read."""
        request_type = GetMessageClass(methods[name].input_type)

        async def handler(requests: AsyncIterator[bytes],
                          context: grpc.aio.ServicerContext) -> Message:
            return await service.received_call(name, request_type, requests, context)

        return grpc.stream_unary_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=response_serializer)

    async def stream(request_iterator: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        async def frames() -> AsyncIterator[omnipose_pb2.StreamFrame]:
            async for data in request_iterator:
                yield parse_message(omnipose_pb2.StreamFrame, data)

        async for result in service.StreamEstimate(frames(), context):
            yield result

    handlers = {name: received_under_budget(name) for name in ("Estimate", "EstimateBatch")}
    handlers["GetModel"] = unary("GetModel")
    handlers["StreamEstimate"] = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=None, response_serializer=response_serializer)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# --- the service -----------------------------------------------------------------------------
class PoseEstimationService(omnipose_pb2_grpc.PoseEstimationServicer):
    """omnipose.v1.PoseEstimation over the shared engine."""

    def __init__(self, engine: PoseEngine, metrics: ServiceMetrics, stream_max_inflight: int):
        self.engine = engine
        self.metrics = metrics
        self.stream_max_inflight = stream_max_inflight
        self._methods = {"Estimate": self._estimate, "EstimateBatch": self._estimate_batch}

    def record_refused(self, method: str, error: EngineError) -> None:
        """Count a call refused before it reached the method (e.g. an unparsable message)."""
        status = GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)
        self.metrics.requests.labels("grpc", method, status.name).inc()

    def _record(self, method: str, status: str, started: float) -> None:
        self.metrics.requests.labels("grpc", method, status).inc()
        self.metrics.request_latency.labels("grpc", method).observe(time.perf_counter() - started)

    async def _unary(self, method: str, context: grpc.aio.ServicerContext,
                     work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work``, turning engine errors into gRPC status codes and recording metrics."""
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        request_id = _call_request_id(context)
        id_metadata = ((REQUEST_ID_KEY, request_id),)
        token = REQUEST_ID.set(request_id)
        context.set_trailing_metadata(id_metadata)
        try:
            return await work()
        except EngineError as exc:
            status = GRPC_STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
            if _cancellation_status(context) == grpc.StatusCode.DEADLINE_EXCEEDED:
                # gRPC already ended the call at its deadline: there is no one to answer.
                status = grpc.StatusCode.DEADLINE_EXCEEDED
                raise asyncio.CancelledError from None
            metadata = id_metadata + (((RETRY_AFTER_KEY, str(exc.retry_after_s)),)
                                      if isinstance(exc, EngineOverloaded) else ())
            await context.abort(status, exc.message, trailing_metadata=metadata)
        except asyncio.CancelledError:
            status = _cancellation_status(context)
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            error = internal_error(f"{method} failed", request_id)
            await context.abort(status, error.message, trailing_metadata=id_metadata)
        finally:
            REQUEST_ID.reset(token)
            self._record(method, status.name, started)
        raise AssertionError("unreachable: context.abort raises")

    def message_reservation(self, method: str) -> int:
        """Bytes a call's message may have (its size is unknown until it is read), reserved
        against the request-bytes budget while it is being received."""
        settings = self.engine.settings
        one = settings.max_image_bytes + MESSAGE_OVERHEAD_BYTES
        most = one if method == "Estimate" else settings.max_images_per_batch * one
        return min(most, settings.grpc_max_message_bytes)

    async def received_call(self, method: str, request_type: type[Message],
                            requests: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> Message:
        """Admission before bytes, as for REST: refused at once if the engine would refuse it
        (RESOURCE_EXHAUSTED / UNAVAILABLE), then the call waits within its deadline for room in
        the budget of request bytes (shared with REST bodies) for its largest possible message,
        and only then reads the message. Once read, the reservation shrinks to the message's
        size and is held until the call is answered. Calls waiting for room hold only what
        HTTP/2 flow control lets gRPC buffer for them."""
        engine = self.engine

        async def work() -> Message:
            engine.check_admissible()
            deadline = engine.deadline_from(_timeout(context))
            budget = engine.admission.body_bytes
            with budget.lease() as lease:
                await budget.take_within(
                    lease, MESSAGE_COPIES * self.message_reservation(method), deadline)
                data = await within_deadline(deadline, anext(aiter(requests), None),
                                             "while its message was still being received")
                if data is None:
                    raise InvalidRequest(f"the {method} call sent no request message")
                budget.give_back(lease, lease.held - MESSAGE_COPIES * len(data))
                request = parse_message(request_type, data)
                del data
                return await self._methods[method](request, context)

        return await self._unary(method, context, work)

    async def Estimate(self, request: omnipose_pb2.EstimateRequest,
                       context: grpc.aio.ServicerContext) -> omnipose_pb2.EstimateResponse:
        return await self._unary("Estimate", context, lambda: self._estimate(request, context))

    async def _estimate(self, request: omnipose_pb2.EstimateRequest,
                        context: grpc.aio.ServicerContext) -> omnipose_pb2.EstimateResponse:
        result = await self.engine.estimate(to_image_request(request), _timeout(context))
        return to_response(result, self.engine)

    async def EstimateBatch(self, request: omnipose_pb2.EstimateBatchRequest,
                            context: grpc.aio.ServicerContext
                            ) -> omnipose_pb2.EstimateBatchResponse:
        return await self._unary("EstimateBatch", context,
                                 lambda: self._estimate_batch(request, context))

    async def _estimate_batch(self, request: omnipose_pb2.EstimateBatchRequest,
                             context: grpc.aio.ServicerContext
                             ) -> omnipose_pb2.EstimateBatchResponse:
        requests = []
        for index, image in enumerate(request.images):
            try:
                requests.append(to_image_request(image))
            except EngineError as exc:
                raise exc.prefixed(f"images[{index}]") from None
        results = await self.engine.estimate_many(requests, _timeout(context))
        return omnipose_pb2.EstimateBatchResponse(
            results=[to_response(result, self.engine) for result in results])

    async def GetModel(self, request: omnipose_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> omnipose_pb2.ModelDescription:
        async def work() -> omnipose_pb2.ModelDescription:
            return to_model_description(self.engine.describe())

        return await self._unary("GetModel", context, work)

    async def _frame(self, frame: omnipose_pb2.StreamFrame, context: grpc.aio.ServicerContext,
                     request_id: str, stream: TrackedStream) -> omnipose_pb2.StreamResult:
        """One frame's answer (its own task); errors become a FrameError so the stream goes on."""
        REQUEST_ID.set(request_id)  # this task's context only
        try:
            request = to_image_request(frame.request)
            request.stream_id, request.end_stream = None, False  # the call is the stream
            result = await self.engine.estimate(request, _timeout(context), stream)
        except Exception as exc:
            error = exc if isinstance(exc, EngineError) else internal_error(
                f"StreamEstimate frame {frame.frame_id} failed")
            status = GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)
            return omnipose_pb2.StreamResult(frame_id=frame.frame_id, error=omnipose_pb2.FrameError(
                code=status.name, message=error.message))
        return omnipose_pb2.StreamResult(frame_id=frame.frame_id,
                                         response=to_response(result, self.engine))

    async def StreamEstimate(self, request_iterator: AsyncIterator[omnipose_pb2.StreamFrame],
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[omnipose_pb2.StreamResult]:
        """Results in frame order, at most ``stream_max_inflight`` frames read but unanswered.

        The reader takes a slot before reading each frame and the writer frees it once that
        frame's result is sent, so a client that sends faster than the model runs is held back
        by HTTP/2 flow control instead of filling the server's memory.
        """
        started = time.perf_counter()
        status = grpc.StatusCode.OK
        request_id = _call_request_id(context)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        slots = asyncio.Semaphore(self.stream_max_inflight)
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
        opened = self.engine.open_stream()  # tracking state, freed when the call ends
        try:
            stream = opened.__enter__()
        except EngineError as exc:  # not ready yet, or draining
            self._record("StreamEstimate", GRPC_STATUS[exc.code].name, started)
            await context.abort(GRPC_STATUS[exc.code], exc.message)

        async def reader() -> None:
            try:
                iterator = aiter(request_iterator)
                while True:
                    await slots.acquire()
                    try:
                        frame = await anext(iterator)
                    except StopAsyncIteration:
                        return
                    pending.put_nowait(asyncio.create_task(self._frame(frame, context,
                                                                        request_id, stream)))
            finally:
                pending.put_nowait(None)

        reading = asyncio.create_task(reader())
        try:
            while (task := await pending.get()) is not None:
                yield await task
                slots.release()
            await reading  # surfaces a failed read (e.g. a malformed message)
        except EngineError as exc:  # a frame that is not a StreamFrame message
            status = GRPC_STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
            await context.abort(status, exc.message)
        except asyncio.CancelledError:
            status = _cancellation_status(context)
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            raise
        finally:
            reading.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
            opened.__exit__(None, None, None)
            self._record("StreamEstimate", status.name, started)


# --- server ----------------------------------------------------------------------------------
def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS from the mounted PEM files (mTLS when a client CA is given); None: plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
        client_ca = (settings.grpc_tls_client_ca_file.read_bytes()
                     if settings.grpc_tls_client_ca_file else None)
    except OSError as exc:
        raise OSError(f"cannot read the TLS files: {exc}") from None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None)



class GrpcServer:
    """The grpc.aio server with the pose service, health (grpc.health.v1) and reflection."""

    def __init__(self, engine: PoseEngine, host: str, port: int,
                 metrics: ServiceMetrics | None = None) -> None:
        settings = engine.settings
        limit = settings.grpc_max_message_bytes
        self.engine = engine
        checker = KeyChecker(load_key_digests(settings.api_key_sha256, settings.api_keys_file))
        interceptors = (
            [GrpcKeyInterceptor(checker, settings.reflection_access)] if checker.enabled else []
        )
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC core's bandwidth-delay probe grows every stream's HTTP/2 receive window
                # (to the whole message on loopback), so calls waiting for room in the byte
                # budget would receive their messages anyway. Without it a waiting stream's
                # window stays at 64 KiB; a stream being read still gets its message's worth.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self.service = PoseEstimationService(engine, metrics or engine.metrics,
                                             settings.stream_max_inflight)
        self.server.add_generic_rpc_handlers((pose_service_handler(self.service),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection_access != "off":
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC server to {address}")

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def _set_all(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def set_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def enter_drain(self) -> None:
        """Health NOT_SERVING for good, so balancers stop sending before the server stops."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let running ones finish within ``grace_s``."""
        await self.server.stop(grace_s)
