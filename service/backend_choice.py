"""``backend=auto``: the runner (backend x precision) that serves the pose model, chosen by
measuring the candidates on this machine at start-up, and remembered on disk.

* **Candidates**: every backend of :data:`omnipose.model.runners.RUNNER_FACTORIES` in every
  precision this CPU computes natively (fp32; bf16 where it has AVX512-BF16/AMX), or only the
  precision the ``precision`` setting names. A backend whose library is not installed, whose
  build fails (an import error, a conversion error) or that refuses the precision is a row of the
  table with the reason, never a failed start. New backends join by registering a factory.
* **Probe**: each candidate is built from its own copy of the network and runs
  ``min(max_batch_size, 4)`` random crops of the configured size on every instance thread of the
  *probe layout* at once, after one warm-up call per thread (sessions, compiled kernels), for
  about :data:`PROBE_SECONDS`. The probe layout is the one the settings fix, else one
  single-threaded instance per usable CPU: every core busy, as under load, and the layout the
  service measured fastest on every machine tried so far. Candidates run one after another; the
  two fastest are measured once more (reverse order, better figure kept) so that a neighbour's
  burst on a shared machine does not decide between close ones. Only those two are kept, so
  memory holds at most three copies of the network.
* **Layout**: measured afterwards for the winner only (:func:`startup.choose_layout`). Measuring
  every candidate under every layout would multiply the start-up cost by the number of layouts
  for a ranking that depends on the backends' kernels, not on how the cores are split.
* **Cache**: the decision is stored under a key of everything it depended on
  (:mod:`omnipose.service.backend_cache`); a start with the same key builds the cached winner and
  measures nothing.
* **CUDA**: torch (CUDA graphs, fp16), nothing measured. **No warm-up** (``warmup=false``): never
  measures; the cached decision if there is one, else torch, so the result is deterministic.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import torch
from torch import nn

from omnipose.model.configs import ModelConfig
from omnipose.model.onnx_runtime import shared_exports
from omnipose.model.precision import Precision, PrecisionSetting, cpu_has_native_bf16
from omnipose.model.runners import (
    RUNNER_FACTORIES,
    Runner,
    RunnerOptions,
    build_runner,
    resolve_device,
)
from omnipose.service import backend_cache
from omnipose.service.resources import (
    InstanceLayout,
    available_cpus,
    candidate_layouts,
    configured_layout,
    measure_layouts,
)
from omnipose.service.settings import ServiceSettings

log = logging.getLogger(__name__)

PROBE_BATCH = 4  # crops per forward of the probe (at most max_batch_size)
PROBE_SECONDS = 0.6  # timed per candidate, after its warm-up
Candidate = tuple[str, str]  # (backend, precision)
Builder = Callable[[str, nn.Module, tuple[int, int], torch.device, str, RunnerOptions], Runner]


@dataclass(frozen=True)
class Measurement:
    """One candidate's row of the table: its crops/s, or why it was not measured."""

    backend: str
    precision: str
    crops_per_s: float | None = None
    note: str = ""
    cost_s: float | None = None  # building and measuring it took (the start-up cost)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    def __str__(self) -> str:
        if self.crops_per_s is None:
            return f"{self.label}: not measured ({self.note})"
        return f"{self.label}: {self.crops_per_s:.1f} crops/s"

    def log_line(self) -> str:
        """:meth:`__str__` with what the row cost, for the start-up log."""
        return f"{self}, {self.cost_s:.1f} s" if self.cost_s is not None else str(self)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision,
                "crops_per_s": self.crops_per_s, "note": self.note,
                "cost_s": self.cost_s}  # fmt: skip


@dataclass(frozen=True)
class BackendChoice:
    """What ``backend=auto`` chose and why: ``source`` is ``measured`` (this start),
    ``cached`` (an earlier start's measurement), ``cuda`` or ``no-warmup`` (torch, nothing
    measured); ``measurements`` is the table behind a measured or cached choice."""

    backend: str
    precision: str
    source: str
    measurements: tuple[Measurement, ...] = ()
    probe: str = ""
    measured_at: str = ""  # UTC, when the table was measured
    measure_s: float | None = None  # what the measurement cost (builds included)

    def describe(self) -> dict[str, Any]:
        """For /v1/models: the choice, where it came from, and the table."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "source": self.source,
            "probe": self.probe,
            "measured_at": self.measured_at,
            "measure_s": self.measure_s,
            "candidates": [m.to_dict() for m in self.measurements],
        }

    def summary(self) -> str:
        """The table in one line (the model-info metric's label)."""
        return "; ".join(str(m) for m in self.measurements)

    @classmethod
    def from_stored(cls, stored: dict[str, Any], source: str) -> BackendChoice:
        rows = tuple(Measurement(**row) for row in stored["candidates"])
        return cls(stored["backend"], stored["precision"], source, rows, stored["probe"],
                   stored["measured_at"], stored["measure_s"])  # fmt: skip


def choose_backend(measurements: Sequence[Measurement]) -> Measurement:
    """The fastest measured candidate (the first listed on a tie); ValueError, with the table,
    when none was measured."""
    measured = [m for m in measurements if m.crops_per_s is not None]
    if not measured:
        raise ValueError("backend auto: no candidate backend could run here: "
                         + "; ".join(map(str, measurements)))  # fmt: skip
    return max(measured, key=lambda m: m.crops_per_s)


def candidate_precisions(setting: PrecisionSetting, native_bf16: bool) -> list[str]:
    """The precisions to try on the CPU: the one the settings name, else fp32 and, where the CPU
    computes it natively, bf16 (emulated bf16 is slower than fp32; fp16 needs CUDA)."""
    if setting != "auto":
        return [setting]
    return [p for p in get_args(Precision) if p == "fp32" or (p == "bf16" and native_bf16)]


def candidates(setting: PrecisionSetting, native_bf16: bool | None = None) -> list[Candidate]:
    """Every registered backend in every candidate precision, torch first."""
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return [(backend, precision) for backend in RUNNER_FACTORIES
            for precision in candidate_precisions(setting, native)]  # fmt: skip


def probe_layout(settings: ServiceSettings, cpus: int) -> InstanceLayout:
    """The layout candidates are measured under: the configured one, else one single-threaded
    instance per usable CPU."""
    return configured_layout(settings, cpus, "cpu") or candidate_layouts(cpus)[0]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def measure_candidates(
    network: nn.Module,
    input_size: tuple[int, int],
    todo: Sequence[Candidate],
    layout: InstanceLayout,
    batch: int,
    seconds: float = PROBE_SECONDS,
    build: Builder = build_runner,
    options: RunnerOptions | None = None,
) -> tuple[list[Measurement], Runner | None]:
    """The table of ``todo`` on the CPU and the fastest candidate's runner (None if none ran).

    Each candidate gets its own deep copy of ``network`` (a torch runner casts it in place);
    the ONNX export behind ONNX Runtime and OpenVINO is made once for all of them
    (:func:`omnipose.model.onnx_runtime.shared_exports`). Candidates run one after another;
    the two fastest are kept and measured once more, in reverse order, each keeping its better
    figure: on a shared machine a neighbour's burst during one probe must not decide between two
    close backends. Memory holds at most three copies of the network."""
    probe = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
    table: list[Measurement] = []
    leaders: list[tuple[float, int, Runner]] = []  # (crops/s, row, runner): the two fastest
    with shared_exports():
        for backend, precision in todo:
            row, runner = _measured_row(backend, precision, network, input_size, probe, layout,
                                        seconds, build, options)  # fmt: skip
            table.append(row)
            if runner is not None:
                leaders = sorted([*leaders, (row.crops_per_s, len(table) - 1, runner)],
                                 key=lambda x: -x[0])[:2]  # fmt: skip
            del runner
    if len(leaders) == 2:
        for _, row, runner in reversed(leaders):
            started = time.perf_counter()
            again = _rate(runner, probe, layout, seconds)
            first = table[row]
            table[row] = replace(
                first,
                crops_per_s=max(first.crops_per_s, again),
                cost_s=round(first.cost_s + time.perf_counter() - started, 2),
            )
    if not leaders:
        return table, None
    winner = choose_backend(table)
    return table, next(r for _, row, r in leaders if table[row] == winner)


def _measured_row(
    backend: str,
    precision: str,
    network: nn.Module,
    input_size: tuple[int, int],
    probe: torch.Tensor,
    layout: InstanceLayout,
    seconds: float,
    build: Builder,
    options: RunnerOptions | None,
) -> tuple[Measurement, Runner | None]:
    """One candidate built from its own copy of ``network`` and timed: its row, and its runner
    (None when it was not measured)."""
    if not backend_cache.backend_installed(backend):
        libraries = ", ".join(backend_cache.backend_libraries(backend))
        return Measurement(backend, precision, note=f"{libraries}: not installed"), None
    started = time.perf_counter()
    try:
        runner = build(backend, copy.deepcopy(network), input_size, torch.device("cpu"),
                       precision, options or RunnerOptions())  # fmt: skip
        rate = _rate(runner, probe, layout, seconds)
    except Exception as exc:  # one candidate failing must not fail the start
        return Measurement(backend, precision, note=_reason(exc)), None
    cost = round(time.perf_counter() - started, 2)
    return Measurement(backend, precision, rate, cost_s=cost), runner


def _rate(runner: Runner, probe: torch.Tensor, layout: InstanceLayout, seconds: float) -> float:
    """Crops/s of ``runner`` on ``probe``, every instance thread of ``layout`` busy at once."""

    def forward() -> int:
        with torch.inference_mode():  # per thread: the instance threads are new ones
            runner.run(probe)
        return probe.shape[0]

    # One timed round at least: on a large network one batch already outlasts ``seconds``.
    return measure_layouts(forward, [layout], seconds, min_rounds=1)[layout]


@dataclass
class AutoBackend:
    """``backend=auto`` for one start: :meth:`runner` is the loader's hook
    (:func:`omnipose.service.loading.load_pose_model`'s ``choose_runner``)."""

    settings: ServiceSettings
    cpus: int = field(default_factory=available_cpus)
    measure: Callable[..., tuple[list[Measurement], Runner | None]] = measure_candidates
    build: Builder = build_runner

    def key(
        self,
        config: ModelConfig,
        weights_sha256: str | None,
        todo: Sequence[Candidate],
        layout: InstanceLayout,
        batch: int,
    ) -> dict[str, Any]:
        """What the decision depends on (see :mod:`omnipose.service.backend_cache`)."""
        backends = sorted({backend for backend, _ in todo})
        return {
            "format": backend_cache.KEY_FORMAT,
            "omnipose": backend_cache.package_version(),
            "weights_sha256": weights_sha256 or "untrained",
            "config": config.to_dict(),
            "input_size": list(config.input_size),
            "precision": self.settings.precision,
            "candidates": [f"{backend} {precision}" for backend, precision in todo],
            "libraries": backend_cache.library_versions(backends),
            "cpu": backend_cache.cpu_identity(),
            "isa_limits": backend_cache.isa_limits(),
            "cpus": self.cpus,
            "probe": {
                "batch": batch,
                "instances": layout.instances,
                "threads": layout.threads,
                "seconds": PROBE_SECONDS,
            },
        }

    def runner(
        self, network: nn.Module, config: ModelConfig, options: RunnerOptions
    ) -> tuple[Runner, BackendChoice]:
        """The chosen runner for ``network`` and the choice behind it; ``options`` go to every
        runner built (the weights' sha256 in them keys the cache)."""
        settings, input_size = self.settings, config.input_size
        device = resolve_device(settings.device)
        if device.type != "cpu":
            runner = self.build("torch", network, input_size, device, settings.precision, options)
            return runner, BackendChoice("torch", runner.precision, "cuda")
        todo = candidates(settings.precision)
        layout = probe_layout(settings, self.cpus)
        batch = min(settings.max_batch_size, PROBE_BATCH)
        key = self.key(config, options.weights_sha256, todo, layout, batch)
        cache = backend_cache.DecisionCache(settings.model_cache_dir())
        stored = cache.load(key)
        if stored is not None:
            try:
                choice = BackendChoice.from_stored(stored, "cached")
                runner = self.build(
                    choice.backend, network, input_size, device, choice.precision, options
                )
            except Exception as exc:
                log.warning("backend auto: the cached choice cannot be used (%s): measuring",
                            _reason(exc))  # fmt: skip
            else:
                log.info(
                    "backend auto: %s %s, cached from a measurement at %s (%s)",
                    choice.backend,
                    choice.precision,
                    choice.measured_at,
                    choice.summary(),
                )
                return runner, choice
        if not settings.warmup:
            runner = self.build("torch", network, input_size, device, settings.precision, options)
            log.info("backend auto without warm-up and without a cached choice: torch %s,"
                     " nothing measured", runner.precision)  # fmt: skip
            return runner, BackendChoice("torch", runner.precision, "no-warmup")
        return self._measured(network, config, options, todo, layout, batch, key, cache)

    def _measured(
        self,
        network: nn.Module,
        config: ModelConfig,
        options: RunnerOptions,
        todo: Sequence[Candidate],
        layout: InstanceLayout,
        batch: int,
        key: dict[str, Any],
        cache: backend_cache.DecisionCache,
    ) -> tuple[Runner, BackendChoice]:
        started = time.perf_counter()
        table, runner = self.measure(network, config.input_size, todo, layout, batch,
                                     build=self.build, options=options)  # fmt: skip
        for row in table:
            log.info("backend auto: %s", row.log_line())
        winner = choose_backend(table)
        assert runner is not None  # choose_backend raised otherwise
        choice = BackendChoice(
            winner.backend,
            winner.precision,
            "measured",
            tuple(table),
            f"{batch} crops of {config.input_size[0]}x{config.input_size[1]}, {layout}",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            round(time.perf_counter() - started, 2),
        )
        log.info(
            "backend auto: chose %s %s (measured in %.1f s on %s)",
            choice.backend,
            choice.precision,
            choice.measure_s,
            choice.probe,
        )
        stored = choice.describe()
        del stored["source"]
        cache.store(key, stored)
        return runner, choice
