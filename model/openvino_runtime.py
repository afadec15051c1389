"""The OpenVINO backend (CPU): the pose network converted to OpenVINO IR, compiled in an explicit
precision, with the converted model and its compiled blobs cached on disk.

**Conversion** goes through the project's ONNX export (:func:`omnipose.model.onnx_runtime.
export_onnx`, dynamic batch), read by OpenVINO's ONNX frontend (``Core.read_model``). Converting
the torch module directly (``convert_model(network, example_input=...)``) gives the same graph
(both 3e-22 from torch on coco-w8-96x64) but took 87 s against 32 s for export + convert on the
shared 2-core dev machine. ``openvino.convert_model`` is not used at all: it starts OpenVINO's
usage telemetry (a thread pool that sends events unless the user opted out), and the service
makes no network calls; ``read_model`` gives the same numbers without it.

**Precision** is always set (``INFERENCE_PRECISION_HINT`` f32 or bf16): OpenVINO's own default
on a CPU with native bf16 is bf16, so leaving it implicit would silently change the numbers.
bf16 is refused where the CPU lacks native bf16 (OpenVINO would emulate or ignore it). ``int8``
means the given model is already quantised (NNCF); its remaining float parts run in f32.

**Threads**: the service runs N pose instances (threads), each calling :meth:`OpenVinoRunner.run`
with its own torch thread count (instances x threads, measured at start-up). The runner keeps
one compiled model per threads-per-caller value with ``NUM_STREAMS`` = usable CPUs / threads and
``INFERENCE_NUM_THREADS`` = streams x threads, and gives each calling thread its own
``InferRequest`` (an InferRequest is not safe to share; the compiled model is). Measured on the
shared 2-core dev machine (coco-w8-96x64, batch 8, two callers, 5 interleaved rounds of 2 s,
crops/s median (min-max)): one model with 2 streams 62.0 (57.5-78.3) unpinned, 60.7 (49.2-80.3)
with OpenVINO's core pinning; one compiled model per calling thread, 1 thread each, 59.7
(54.4-82.0); one caller on 2 threads 43.9 (34.5-87.7). The three two-caller forms are equal
within the noise, so the runner takes the one that compiles once and holds the weights once,
and leaves pinning off as torch's instances do (pinned streams fight other processes for fixed
cores on a shared or quota-limited machine).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from omnipose.model import precision as precision_module
from omnipose.model.cpu_info import read_cpu_info
from omnipose.model.onnx_runtime import state_dict_sha256

if TYPE_CHECKING:
    import openvino

log = logging.getLogger(__name__)

# `import openvino` sends usage telemetry unless the user opted out (a file in their home): it
# posts from a forked copy of the process (multiprocessing, no exec). In the service that copy
# held the listening sockets and gRPC's threads, answered nothing, and kept the server from
# becoming ready and from exiting on SIGTERM; and the service never talks to the network at run
# time. With its package unimportable, OpenVINO uses its own no-op stub. Set before this module
# imports openvino (every import of it here is inside a function).
sys.modules.setdefault("openvino_telemetry", None)

OpenVinoPrecision = Literal["fp32", "bf16", "int8"]
# INFERENCE_PRECISION_HINT per precision; int8 models keep their non-quantised parts in f32.
PRECISION_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# CPU flags that change which kernels OpenVINO compiles (a compiled blob is only valid for them).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
IR_NAME = "model.xml"
CACHE_SUBDIR = "openvino"


def import_openvino() -> Any:
    """``openvino``, with its usage telemetry unimportable (see the module's
    ``openvino_telemetry`` note above): every import of it in the project goes through here."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


@functools.cache
def openvino_core() -> openvino.Core:
    """The process's one OpenVINO Core, shared by every runner and conversion.

    OpenVINO means one Core per application (its methods are thread-safe; settings go with each
    compile, never on the Core). A second Core in one process has crashed some builds on
    creation (openvinotoolkit/openvino#35338) and a test process holding dozens crashed at exit.
    """
    return import_openvino().Core()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity); the service passes its cgroup-aware count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_openvino_precision(precision: str) -> None:
    """ValueError for a precision OpenVINO does not run here (unknown, or bf16 without native
    bf16 on this CPU)."""
    if precision not in PRECISION_HINTS:
        raise ValueError(f"the openvino backend runs {', '.join(PRECISION_HINTS)},"
                         f" not {precision!r}")
    if precision == "bf16" and not precision_module.cpu_has_native_bf16():
        raise ValueError("precision bf16 on the openvino backend needs a CPU with native bf16"
                         " (AVX512-BF16 or AMX); this one has neither: use fp32")


class OpenVinoRunner:
    """An OpenVINO model compiled for the CPU in an explicit precision (the Runner protocol).

    ``threads``: threads per concurrent call (per stream); None: each calling thread's torch
    thread count, so the service's instance layout carries over. ``streams``: calls that run at
    once; None: usable CPUs // threads. ``cache_dir``: OpenVINO's CACHE_DIR for compiled blobs
    (a restart imports the blob instead of compiling).
    """

    backend = "openvino"

    def __init__(self, ov_model: openvino.Model, precision: OpenVinoPrecision,
                 threads: int | None = None, streams: int | None = None,
                 cache_dir: Path | None = None, cpus: int | None = None) -> None:
        check_openvino_precision(precision)
        if any(value is not None and value < 1 for value in (threads, streams)):
            raise ValueError(f"threads and streams must be at least 1 (got {threads}, {streams})")
        self.ov_model = ov_model
        self.precision = precision
        self.device = torch.device("cpu")
        self.threads, self.streams = threads, streams
        self.cpus = cpus or usable_cpus()
        self.cache_dir = cache_dir
        self.converted = False  # set by from_network: False when the IR came from the cache
        self._core = openvino_core()
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._in_flight = 0  # run() calls now running (a lone one runs on every core)
        self._all_cores: Any = None  # compiled on the first lone call
        self.lone_on_all_cores = True
        self._local = threading.local()
        if threads is not None:
            self._compiled_for(threads)  # fixed layout: compile now

    @classmethod
    def from_network(cls, network: nn.Module, input_size: tuple[int, int],
                     precision: OpenVinoPrecision, *, threads: int | None = None,
                     streams: int | None = None, cache_dir: Path | None = None,
                     weights_sha256: str | None = None, config_name: str | None = None,
                     cpus: int | None = None) -> OpenVinoRunner:
        """The torch network converted (or its converted IR read from ``cache_dir``, keyed by
        :func:`ir_key`) and compiled; compiled blobs cached under the IR's folder."""
        check_openvino_precision(precision)
        folder = usable_cache_dir(cache_dir)
        ov_model, converted, blobs = cached_model(network, input_size, precision, folder,
                                                  weights_sha256, config_name)
        runner = cls(ov_model, precision, threads, streams, blobs, cpus)
        runner.converted = converted
        return runner

    def layout(self, threads: int) -> tuple[int, int]:
        """(streams, threads per stream) of the compiled model for callers with ``threads``."""
        threads = self.threads or threads
        return self.streams or max(1, self.cpus // threads), threads

    def compile_config(self, threads: int) -> dict[str, Any]:
        """The properties the model is compiled with (explicit precision, streams, threads)."""
        streams, per_stream = self.layout(threads)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision],
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": streams * per_stream,
            "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        return config

    def _compiled_for(self, threads: int) -> Any:
        key = self.threads or threads
        compiled = self._compiled.get(key)
        if compiled is None:
            with self._lock:  # two instance threads starting at once compile once
                compiled = self._compiled.get(key)
                if compiled is None:
                    compiled = self._core.compile_model(self.ov_model, "CPU",
                                                        self.compile_config(key))
                    self._compiled[key] = compiled
        return compiled

    def _request(self) -> Any:
        """This thread's InferRequest on the compiled model for its thread count."""
        threads = self.threads or torch.get_num_threads()
        requests: dict[int, Any] = self._local.__dict__.setdefault("requests", {})
        request = requests.get(threads)
        if request is None:
            request = self._compiled_for(threads).create_infer_request()
            requests[threads] = request
        return request

    def _lone_request(self) -> Any:
        """This thread's InferRequest on a model compiled for one stream on every usable CPU."""
        request = getattr(self._local, "lone", None)
        if request is None:
            with self._lock:
                if self._all_cores is None:
                    config = {**self.compile_config(self.cpus), "NUM_STREAMS": 1,
                              "INFERENCE_NUM_THREADS": self.cpus, "PERFORMANCE_HINT": "LATENCY"}
                    self._all_cores = self._core.compile_model(self.ov_model, "CPU", config)
            request = self._local.lone = self._all_cores.create_infer_request()
        return request

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        """Heatmaps of ``crops``. A call alone in the runner (no other caller in flight), where
        the layout has several streams, runs on a model compiled for one stream on every core,
        so a lone request is as fast as the network can be (as torch's lone-batch rule does);
        overlapping calls keep one stream each, the layout measured fastest for throughput."""
        inputs = np.ascontiguousarray(crops.detach().float().cpu().numpy())
        threads = self.threads or torch.get_num_threads()
        with self._lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            lone = alone and self.lone_on_all_cores and self.layout(threads)[0] > 1
            request = self._lone_request() if lone else self._request()
            request.infer({0: inputs}, share_inputs=True)
            # The output is the request's own buffer, reused by its next call: copy it.
            heatmaps = np.array(request.get_output_tensor(0).data, copy=True)
        finally:
            with self._lock:
                self._in_flight -= 1
        return torch.from_numpy(heatmaps).to(crops.device)


def convert_network(network: nn.Module, input_size: tuple[int, int]) -> openvino.Model:
    """The network as an OpenVINO model (dynamic batch) via the project's ONNX export."""
    from omnipose.model.onnx_runtime import export_onnx

    return openvino_core().read_model(io.BytesIO(export_onnx(network.eval(), input_size)))



def cpu_isa_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The kernel-relevant ISA flags of this CPU, plus any oneDNN ISA cap in the environment."""
    flags = sorted(read_cpu_info(cpuinfo).flags & set(ISA_FLAGS))
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return [*flags, f"cap={cap}"] if cap else flags


def compiled_kernels(model: openvino.Model, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(layer type, kernel) pairs of ``model`` compiled for the CPU with ``config``, e.g.
    ``("Convolution", "brgconv_avx2_I8")``: which ISA the plugin's kernels use on this CPU or
    under an ``ONEDNN_MAX_CPU_ISA`` cap (tests/test_int8.py checks the int8 model's with it)."""
    compiled = openvino_core().compile_model(model, "CPU", config)
    return sorted({(op.get_rt_info()["layerType"].astype(str),
                    op.get_rt_info()["primitiveType"].astype(str))
                   for op in compiled.get_runtime_model().get_ordered_ops()})  # fmt: skip


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def ir_key(weights_sha256: str, config_name: str | None, input_size: tuple[int, int]) -> str:
    """The converted IR's cache key: weights, config, crop size and the converting versions."""
    openvino = import_openvino()

    from omnipose.model.onnx_runtime import OPSET

    return _digest({"weights": weights_sha256, "config": config_name,
                    "input_size": list(input_size), "openvino": openvino.get_version(),
                    "torch": torch.__version__, "opset": OPSET})


def blobs_key(precision: str) -> str:
    """The compiled blobs' folder name: precision and the CPU's ISA flags (OpenVINO keys its own
    blobs by compile properties too; the folder keeps other CPUs' blobs apart on shared disks)."""
    return f"compiled-{precision}-{_digest({'isa': cpu_isa_flags()})[:12]}"


def usable_cache_dir(cache_dir: Path | None) -> Path | None:
    """``cache_dir``'s OpenVINO folder if it can be created and written, else None with one
    warning (the runner then converts and compiles at every start)."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir) / CACHE_SUBDIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        log.warning("model cache %s is not writable (%s): the openvino backend runs uncached,"
                    " converting the network at every start", folder, exc)
        return None
    return folder


def cached_model(network: nn.Module, input_size: tuple[int, int], precision: str,
                 folder: Path | None, weights_sha256: str | None,
                 config_name: str | None) -> tuple[openvino.Model, bool, Path | None]:
    """(the OpenVINO model, whether it was converted now, the compiled-blob folder or None).

    The IR is written to a temporary folder and renamed into place, so a concurrent start (two
    replicas on one volume) never reads a half-written model."""
    openvino = import_openvino()

    if folder is None:
        return convert_network(network, input_size), True, None
    key = ir_key(weights_sha256 or state_dict_sha256(network), config_name, input_size)
    target = folder / key
    xml = target / IR_NAME
    if xml.is_file():
        try:
            return openvino_core().read_model(xml), False, _blobs_folder(target, precision)
        except RuntimeError as exc:  # a damaged cache entry: convert again
            log.warning("cached OpenVINO model %s unreadable (%s): converting again", xml, exc)
            shutil.rmtree(target, ignore_errors=True)
    ov_model = convert_network(network, input_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder))
    try:
        openvino.save_model(ov_model, staging / IR_NAME, compress_to_fp16=False)
        os.rename(staging, target)
    except OSError as exc:
        if not xml.is_file():  # not another process winning the race: say so
            log.warning("could not store the converted model in %s (%s)", target, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ov_model, True, _blobs_folder(target, precision) if xml.is_file() else None


def _blobs_folder(target: Path, precision: str) -> Path | None:
    blobs = target / blobs_key(precision)
    try:
        blobs.mkdir(exist_ok=True)
    except OSError:
        return None
    return blobs


def precisions() -> tuple[str, ...]:
    """The precisions the openvino backend knows (for error messages and settings)."""
    return get_args(OpenVinoPrecision)
