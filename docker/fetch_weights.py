"""Download a pose checkpoint for the image's ``*-baked`` targets (stdlib only: runs on any base).

A build that asks for baked weights must not silently produce an image without them, so an empty
URL or a checksum mismatch is an error rather than a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

CHUNK_BYTES = 1 << 20


def download(url: str, out: Path, sha256: str, timeout_s: float = 60.0) -> str:
    """Stream ``url`` to ``out`` (atomically) and return its sha256; verify it when given."""
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        urllib.request.urlopen(url, timeout=timeout_s) as response,
        tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp,
    ):
        while chunk := response.read(CHUNK_BYTES):
            digest.update(chunk)
            tmp.write(chunk)
    actual = digest.hexdigest()
    if sha256 and actual.lower() != sha256.lower():
        Path(tmp.name).unlink(missing_ok=True)
        raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}")
    shutil.move(tmp.name, out)
    return actual


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--url`` (required, non-empty), ``--sha256`` (optional), ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="")
    parser.add_argument("--sha256", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.url:
        print(
            "fetch_weights: WEIGHTS_URL is empty; pass --build-arg WEIGHTS_URL=... or "
            "--build-context weights=<dir with pose.pt>",
            file=sys.stderr,
        )
        return 2
    try:
        actual = download(args.url, args.out, args.sha256)
    except (OSError, ValueError) as exc:
        print(f"fetch_weights: {exc}", file=sys.stderr)
        return 1
    print(f"fetch_weights: {args.out} sha256={actual}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
