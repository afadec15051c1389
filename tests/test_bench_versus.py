"""bench/load.py --versus-ray: its ratios are taken round by round, and a missing Ray says so.

The comparison itself (three servers, minutes) is run by hand (bench/README.md); these check the
parts that decide what it prints.
"""

from __future__ import annotations

import importlib.util

import pytest

from bench import ray_serve
from bench.load import parse_args
from bench.versus import Measure, run_versus, summarise


def rounds_of(values: list[dict[str, tuple[float, float]]]) -> list[dict[str, Measure]]:
    """Rounds from {variant@level: (images/s, p50 ms)}."""
    return [{key: Measure(key.split("@")[0], int(key.split("@")[1]), 10, 0, 1.0, ips, p50, p50)
             for key, (ips, p50) in round_.items()} for round_ in values]


def test_ratios_are_taken_within_each_round_then_summarised() -> None:
    # Round 2 is twice as slow for everyone (a busy machine): its ratios equal round 1's, so
    # the summary's ratios have no spread, while the variants' own figures do.
    rounds = rounds_of([
        {"ours@1": (5.0, 100.0), "ray@1": (2.0, 400.0), "raw@1": (6.0, 80.0),
         "ours@16": (20.0, 0.0), "ray@16": (8.0, 0.0), "raw@16": (25.0, 0.0)},
        {"ours@1": (2.5, 200.0), "ray@1": (1.0, 800.0), "raw@1": (3.0, 160.0),
         "ours@16": (10.0, 0.0), "ray@16": (4.0, 0.0), "raw@16": (12.5, 0.0)},
    ])
    lines = summarise(rounds, 16)
    text = "\n".join(lines)
    assert "ours/ray images/s at 16 clients: 2.5 (2.5-2.5)" in text
    assert "ours/ray p50 at 1 client: 0.25 (0.25-0.25)" in text
    assert "ours/raw p50 at 1 client: 1.25 (1.25-1.25)" in text
    assert "ours/raw images/s at 16 clients: 0.8 (0.8-0.8)" in text
    ours = next(line for line in lines if line.strip().startswith("ours "))
    assert "15 (10-20)" in ours and "150 (100-200)" in ours


def test_without_ray_the_comparison_stops_with_a_clear_message(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "ray" or name.startswith("ray.") else real_find_spec(
            name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert ray_serve.ray_missing() == ray_serve.RAY_MISSING
    args = parse_args(["--versus-ray", "--quick"])

    def no_server(args):  # never reached: the check comes before anything starts
        raise AssertionError("a server was started without Ray")

    with pytest.raises(SystemExit) as stopped:
        run_versus(args, b"", [[0.0, 0.0, 1.0, 1.0]], no_server)
    assert "pip install -e '.[bench]'" in str(stopped.value)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the bench extra is absent")
# Ray Serve's own config models use pydantic-1 style Field extras: its import warnings, not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_with_ray_installed_nothing_is_missing() -> None:
    assert ray_serve.ray_missing() is None
