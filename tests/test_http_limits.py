"""Transport limits that need no server: the descriptor-safe connection limit and the rate-limited
report of failed accept() calls."""

from __future__ import annotations

import asyncio
import logging
import resource
import subprocess
import sys

from omnipose.service.http_server import (
    ACCEPT_FAILURE,
    RESERVED_DESCRIPTORS,
    AcceptFailureLog,
    descriptor_safe_limit,
)


def limit_under_ulimit(open_files: int, configured: int) -> str:
    """descriptor_safe_limit(configured) in a process whose open-files limit is ``open_files``
    (soft and hard), as ``ulimit -n`` sets it for a container."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files}))\n"
        "from omnipose.service.http_server import descriptor_safe_limit\n"
        f"print(descriptor_safe_limit({configured}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.strip() + "|" + result.stderr


def test_connection_limit_stays_below_the_open_files_limit() -> None:
    out, log_text = limit_under_ulimit(1024, 1000).split("|", 1)
    assert int(out) == 1024 - RESERVED_DESCRIPTORS
    assert "lowered to 768" in log_text and "1024" in log_text


def test_connection_limit_is_kept_when_descriptors_suffice() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000 + RESERVED_DESCRIPTORS:
        out = limit_under_ulimit(4096, 1000).split("|", 1)[0]
        assert int(out) == 1000
        return
    assert descriptor_safe_limit(1000) == 1000
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft  # raised, never lowered


def test_failed_accepts_are_reported_at_most_once_per_interval(caplog) -> None:
    handler = AcceptFailureLog(interval_s=3600.0)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="omnipose.service.http_server"):
            for _ in range(500):
                handler(loop, {"message": ACCEPT_FAILURE, "exception": OSError(24, "EMFILE")})
    finally:
        loop.close()
    reports = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(reports) == 1 and handler.suppressed == 499


def test_other_loop_errors_still_reach_the_default_handler(caplog) -> None:
    handler = AcceptFailureLog()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            handler(loop, {"message": "something else broke"})
    finally:
        loop.close()
    assert any("something else broke" in r.getMessage() for r in caplog.records)
