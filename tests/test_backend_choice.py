"""backend=auto (service/backend_choice.py, service/backend_cache.py): the fastest measured
candidate wins, the decision is cached under its key and a changed key measures again, no warm-up
never measures, and a served model reports the table over REST, gRPC and the model-info metric."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from omnipose.model import runners
from omnipose.model.configs import get_config
from omnipose.model.network import build_model
from omnipose.model.runners import RunnerOptions, TorchRunner
from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc
from omnipose.service import backend_cache, loading
from omnipose.service.backend_choice import (
    AutoBackend,
    Measurement,
    candidates,
    choose_backend,
    measure_candidates,
)
from omnipose.service.resources import InstanceLayout
from omnipose.service.settings import ServiceSettings

SMALL = get_config("coco-w8-96x64")


# --- the choice ------------------------------------------------------------------------------
def test_the_fastest_measured_candidate_is_chosen() -> None:
    table = [
        Measurement("torch", "fp32", 100.0),
        Measurement("torch", "bf16", 180.0),
        Measurement("openvino", "fp32", note="openvino: not installed"),
        Measurement("onnxruntime", "fp32", 150.0),
    ]
    assert choose_backend(table).label == "torch bf16"
    assert choose_backend(table[::-1]).label == "torch bf16"  # not the first or last listed
    tie = [Measurement("torch", "fp32", 90.0), Measurement("onnxruntime", "fp32", 90.0)]
    assert choose_backend(tie).backend == "torch"  # ties: the first listed, deterministic


def test_no_measured_candidate_is_a_clear_error() -> None:
    table = [Measurement("torch", "fp16", note="ValueError: precision fp16 needs a CUDA device")]
    with pytest.raises(ValueError, match=r"no candidate backend.*torch fp16: not measured"):
        choose_backend(table)


def test_candidates_are_every_registered_backend_in_the_native_precisions(monkeypatch) -> None:
    monkeypatch.setitem(runners.RUNNER_FACTORIES, "fake", runners.RUNNER_FACTORIES["torch"])
    registered = list(runners.RUNNER_FACTORIES)
    assert registered[0] == "torch" and registered[-1] == "fake"
    assert candidates("auto", native_bf16=False) == [(b, "fp32") for b in registered]
    assert candidates("auto", native_bf16=True) == [
        (b, p) for b in registered for p in ("fp32", "bf16")
    ]
    assert candidates("fp32", native_bf16=True) == [(b, "fp32") for b in registered]
    assert {precision for _, precision in candidates("bf16", native_bf16=False)} == {"bf16"}


def test_measurement_runs_the_real_runners_and_reports_what_it_skipped(monkeypatch) -> None:
    """The real measurement path on the small network with a short probe: torch runs in both
    precisions; a backend whose library is missing, one whose build fails and one that refuses
    the precision are rows with the reason, and the start goes on. (ONNX Runtime's export is
    measured once, in the whole-path test below.)"""

    def broken(*args):
        raise RuntimeError("conversion failed\nsecond line")

    monkeypatch.setitem(runners.RUNNER_FACTORIES, "broken", broken)
    monkeypatch.setitem(backend_cache.BACKEND_LIBRARIES, "broken", ("torch",))
    todo = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "bf16"),
            ("missing", "fp32"), ("broken", "fp32")]  # fmt: skip
    network = build_model(SMALL).eval()
    table, runner = measure_candidates(network, SMALL.input_size, todo, InstanceLayout(1, 1),
                                       batch=2, seconds=0.05)  # fmt: skip
    rows = {m.label: m for m in table}
    assert [m.label for m in table] == [f"{b} {p}" for b, p in todo]
    for label in ("torch fp32", "torch bf16"):
        assert rows[label].crops_per_s > 0 and rows[label].cost_s > 0, label
    assert "runs fp32" in rows["onnxruntime bf16"].note
    assert rows["missing fp32"].note == "missing: not installed"
    assert rows["broken fp32"].note == "RuntimeError: conversion failed"
    winner = choose_backend(table)
    assert (runner.backend, runner.precision) == (winner.backend, winner.precision)
    assert next(network.parameters()).dtype == torch.float32  # each candidate had its copy


# --- the cache -------------------------------------------------------------------------------
class CountingMeasure:
    """A measurement that says ONNX Runtime is fastest and hands back a torch runner standing in
    for it (no export), counting its calls: the cache is hit when it is not called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, network, input_size, todo, layout, batch, build, options):
        self.calls += 1
        table = [Measurement(b, p, 50.0 + 10 * i) for i, (b, p) in enumerate(todo)]
        winner = choose_backend(table)
        return table, FakeRunner(winner.backend, winner.precision, network)


class FakeRunner(TorchRunner):
    def __init__(self, backend: str, precision: str, network) -> None:
        super().__init__(network, "cpu", "fp32")
        self.backend, self.precision = backend, precision


def stand_in_build(backend, network, input_size, device, precision, options):
    """What the cached path builds: a torch runner labelled as the cached backend."""
    return FakeRunner(backend, precision, network)


def load(settings: ServiceSettings, measure: CountingMeasure) -> loading.LoadedPoseModel:
    """The embedded default's weights through backend=auto, from a copy without the shipped int8
    model beside it (auto would serve that and measure nothing)."""
    auto = AutoBackend(settings, cpus=2, measure=measure, build=stand_in_build)
    weights = settings.model_cache_dir().parent / "auto-weights" / loading.DEFAULT_WEIGHTS.name
    if not weights.is_file():
        weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(loading.DEFAULT_WEIGHTS, weights)
    return loading.load_pose_model(weights, settings.config, "cpu", settings.precision,
                                   backend="auto", cache_dir=settings.model_cache_dir(),
                                   choose_runner=auto.runner)  # fmt: skip


def auto_settings(cache: Path, **overrides) -> ServiceSettings:
    return ServiceSettings(config=SMALL.name, device="cpu", cache_dir=cache, **overrides)


def test_the_second_start_uses_the_cached_choice(tmp_path: Path) -> None:
    measure = CountingMeasure()
    first = load(auto_settings(tmp_path), measure)
    assert measure.calls == 1
    choice = first.describe()["backend_choice"]
    assert choice["source"] == "measured" and first.backend == choice["backend"]
    fastest = max(choice["candidates"], key=lambda row: row["crops_per_s"])
    assert (choice["backend"], choice["precision"]) == (fastest["backend"], fastest["precision"])
    stored = list((tmp_path / backend_cache.DECISIONS_FOLDER).glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["key"]["cpus"] == 2

    second = load(auto_settings(tmp_path), measure)
    assert measure.calls == 1  # not measured again
    cached = second.describe()["backend_choice"]
    assert cached["source"] == "cached"
    assert {k: v for k, v in cached.items() if k != "source"} == {
        k: v for k, v in choice.items() if k != "source"
    }
    assert (second.backend, second.estimator.precision) == (choice["backend"],
                                                            choice["precision"])  # fmt: skip


@pytest.mark.parametrize("change", ["precision", "probe batch", "library", "cpu", "cpus"])
def test_a_changed_key_measures_again(tmp_path: Path, monkeypatch, change: str) -> None:
    measure = CountingMeasure()
    load(auto_settings(tmp_path), measure)
    overrides, cpus = {}, 2
    if change == "precision":
        overrides["precision"] = "fp32"
    elif change == "probe batch":
        overrides["max_batch_size"] = 2
    elif change == "library":
        real = backend_cache.library_version
        monkeypatch.setattr(
            backend_cache,
            "library_version",
            lambda name: "9.9" if name == "onnxruntime" else real(name),
        )
    elif change == "cpu":
        monkeypatch.setattr(
            backend_cache, "cpu_identity", lambda: {"model": "another CPU", "flags_sha256": "0"}
        )
    else:
        cpus = 4
    auto = AutoBackend(auto_settings(tmp_path, **overrides), cpus=cpus, measure=measure,
                       build=stand_in_build)  # fmt: skip
    _, choice = auto.runner(build_model(SMALL).eval(), SMALL, RunnerOptions())
    assert measure.calls == 2 and choice.source == "measured"


def test_without_warmup_nothing_is_measured(tmp_path: Path) -> None:
    """No cached choice: torch, deterministically; a cached one: that."""
    measure = CountingMeasure()
    cold = load(auto_settings(tmp_path, warmup=False), measure)
    assert measure.calls == 0
    assert cold.backend == "torch" and cold.describe()["backend_choice"]["source"] == "no-warmup"
    assert cold.describe()["backend_choice"]["candidates"] == []
    measured = load(auto_settings(tmp_path), measure)
    assert measure.calls == 1
    warm = load(auto_settings(tmp_path, warmup=False), measure)
    assert measure.calls == 1
    assert warm.describe()["backend_choice"]["source"] == "cached"
    assert warm.backend == measured.backend


def test_an_unwritable_cache_is_one_warning_not_a_failure(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    measure = CountingMeasure()
    with caplog.at_level(logging.WARNING, logger="omnipose.service.backend_cache"):
        loaded = load(auto_settings(blocked), measure)
    assert loaded.describe()["backend_choice"]["source"] == "measured"
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("omnipose.service.backend")
    ]
    assert len(warnings) == 1 and "cannot cache the backend choice" in warnings[0].getMessage()
    load(auto_settings(blocked), measure)
    assert measure.calls == 2  # nothing was cached: measured again


def test_a_foreign_or_damaged_cache_file_is_a_miss(tmp_path: Path) -> None:
    measure = CountingMeasure()
    load(auto_settings(tmp_path), measure)
    (stored,) = (tmp_path / backend_cache.DECISIONS_FOLDER).glob("*.json")
    stored.write_text("{not json")
    load(auto_settings(tmp_path), measure)
    assert measure.calls == 2


def test_cache_folder_follows_the_setting_then_xdg(tmp_path: Path, monkeypatch) -> None:
    assert ServiceSettings(cache_dir=tmp_path / "mine").model_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ServiceSettings().model_cache_dir() == tmp_path / "xdg" / "omnipose"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ServiceSettings().model_cache_dir() == Path.home() / ".cache" / "omnipose"


def test_auto_is_the_default_and_needs_the_service(monkeypatch) -> None:
    monkeypatch.delenv("OMNIPOSE_BACKEND", raising=False)
    assert ServiceSettings().backend == "auto"
    with pytest.raises(ValueError, match="backend auto is chosen by the service"):
        loading.load_pose_model(config_name=SMALL.name, device="cpu", backend="auto")


def test_the_real_measurement_chooses_and_caches_on_the_default_model(
    tmp_path: Path, monkeypatch
) -> None:
    """The whole path once, on the embedded default with a short probe: measured, the winner
    is the fastest row and what serves, then a second start reads it back. OpenVINO is left
    out here (its conversion and its runner have their own tests, and converting twice costs
    tens of seconds on two shared cores); the served auto server below measures it."""
    monkeypatch.delitem(runners.RUNNER_FACTORIES, "openvino", raising=False)
    settings = ServiceSettings(device="cpu", cache_dir=tmp_path)
    short = functools.partial(measure_candidates, seconds=0.05)
    first = loading.load_pose_model(
        device="cpu", backend="auto", choose_runner=AutoBackend(settings, measure=short).runner
    )
    choice = first.backend_choice
    assert choice.source == "measured"
    rows = {m.label: m for m in choice.measurements}
    assert rows["torch fp32"].crops_per_s and rows["onnxruntime fp32"].crops_per_s
    assert choose_backend(choice.measurements).label == f"{choice.backend} {choice.precision}"
    assert (first.backend, first.estimator.precision) == (choice.backend, choice.precision)

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured although the choice was cached")

    second = loading.load_pose_model(
        device="cpu",
        backend="auto",
        choose_runner=AutoBackend(settings, measure=must_not_measure).runner,
    )
    assert second.backend_choice.source == "cached" and second.backend == first.backend


# --- what a served model reports -------------------------------------------------------------
def test_models_endpoint_grpc_and_metric_show_the_measured_table(slow_server) -> None:
    """The slow server starts as the default deployment: backend=auto, warm-up on."""
    with httpx.Client(base_url=slow_server.http_url, timeout=30) as client:
        model = client.get("/v1/models").json()
    choice = model["backend_choice"]
    assert choice["source"] in ("measured", "cached")
    measured = [row for row in choice["candidates"] if row["crops_per_s"] is not None]
    assert ("torch", "fp32") in {(row["backend"], row["precision"]) for row in measured}
    fastest = max(measured, key=lambda row: row["crops_per_s"])
    assert (model["backend"], model["precision"]) == (fastest["backend"], fastest["precision"])
    assert (choice["backend"], choice["precision"]) == (model["backend"], model["precision"])
    assert "crops of 128x96" in choice["probe"]

    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        described = omnipose_pb2_grpc.PoseEstimationStub(channel).GetModel(
            omnipose_pb2.GetModelRequest(), timeout=30
        )
    assert described.backend == model["backend"]
    assert described.backend_choice.source == choice["source"]
    assert [
        (row.backend, row.precision, row.crops_per_s if row.HasField("crops_per_s") else None)
        for row in described.backend_choice.candidates
    ] == [(row["backend"], row["precision"], row["crops_per_s"]) for row in choice["candidates"]]

    info = next(
        dict(labels) for name, labels in slow_server.scrape() if name == "omnipose_model_info"
    )
    assert info["backend"] == model["backend"] and info["backend_choice"] == choice["source"]
    assert "torch fp32:" in info["backend_table"]
