"""Where a request alone in the service spends its time: the server's own per-stage timings.

Starts the service (default settings unless ``--server-arg`` says otherwise, flip off, no
detector: the client sends the boxes), sends ``--requests`` requests one after another with the
image and boxes ``load.py --versus-ray`` uses, and prints the median of each stage the response
reports (``timings_ms``) beside the client's own latency. The gap between ``client`` and
``pose_inference`` is the service's cost beyond the forward pass::

    .venv/bin/python bench/lone_request.py --config coco-w48-128x96 --persons 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* when run as a script
from bench.load import person_boxes, sample_image
from bench.local_server import local_server

WARMUP_REQUESTS = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="coco-w48-128x96")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--persons", type=int, default=3)
    parser.add_argument("--image-width", type=int, default=640)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server flag, e.g. --server-arg=--backend=torch (repeatable)")
    args = parser.parse_args()

    image = sample_image(args.image_width)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    params = {"boxes": json.dumps(person_boxes(args.persons, image.shape[1], image.shape[0]))}
    server_args = ["--config", args.config, "--device", "cpu", "--log-level", "warning",
                   "--detector", "none", "--no-flip-test",
                   *(["--weights", args.weights] if args.weights else []), *args.server_arg]
    with (local_server(server_args, {**os.environ, "YOLO_OFFLINE": "1"}) as server,
          httpx.Client(base_url=server.http_url, timeout=60) as client):
        model = client.get("/v1/models").json()
        model = model[0] if isinstance(model, list) else model
        print(f"{args.config}: {model['backend']} {model['precision']},"
              f" {model['model_instances']} instance(s) x {model['torch_threads']} thread(s)")
        rows = []
        for index in range(WARMUP_REQUESTS + args.requests):
            started = time.perf_counter()
            response = client.post("/v1/pose", content=encoded.tobytes(), params=params,
                                   headers={"content-type": "image/jpeg"})
            latency_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if index >= WARMUP_REQUESTS:
                rows.append({**response.json()["timings_ms"], "client": latency_ms})
    print(f"median of {len(rows)} requests, one at a time (ms):")
    for stage in rows[0]:
        print(f"  {stage:16s} {statistics.median(row[stage] for row in rows):8.2f}")
    beyond = statistics.median(row["client"] - row["pose_inference"] for row in rows)
    print(f"  {'beyond forward':16s} {beyond:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
