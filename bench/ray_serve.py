"""A minimal Ray Serve deployment of the same pose network: what users compare us with.

``bench/load.py --versus-ray`` runs it beside the service. It is the deployment a user writes
from Ray Serve's batching guide, with nothing of the service's machinery: one replica, one
HTTP endpoint that takes the image as the request body and the person boxes as the ``boxes``
query parameter (as ``POST /v1/pose`` does), decodes the JPEG with OpenCV, cuts the crops with
the project's own crop functions (:func:`omnipose.model.crops.crop_persons`, so both sides feed
the network the same inputs), and hands them to a ``@serve.batch(max_batch_size=16,
batch_wait_timeout_s=0.01)`` method that concatenates the crops of up to 16 requests, runs the
torch fp32 network in one forward pass and decodes each request's keypoints with the project's
decoder (``TopDownPoseEstimator.decode``, OKS-NMS included, as the service does).

Ray is kept small for a 2-core machine: ``ray.init(num_cpus=...)``, no dashboard, warnings only,
workers' logs not forwarded, access logs off, usage statistics off (no network), and the
replica's torch thread count set explicitly to the service's (Ray would otherwise set
``OMP_NUM_THREADS`` from the actor's CPU count). ``max_ongoing_requests`` is raised to 32 so a
batch can fill to 16 (Ray's default of 5 would cap it).

Ray Serve is optional (the ``bench`` extra); :func:`ray_missing` says so before anything starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY_BATCH_SIZE = 16  # the comparison the issue names: @serve.batch(16, 10 ms)
RAY_BATCH_WAIT_S = 0.01
RAY_MAX_ONGOING = 32  # >= the batch size, or Ray never forms a batch of 16
ROUTE = "/pose"
RAY_MISSING = (
    "Ray Serve is not installed, so bench/load.py --versus-ray cannot run: install the bench"
    " extra (.venv/bin/pip install -e '.[bench]', which pins ray[serve]), or leave out"
    " --versus-ray"
)


def ray_missing() -> str | None:
    """Why the Ray Serve comparison cannot run here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return RAY_MISSING
    try:
        importlib.util.find_spec("ray.serve")
        import ray.serve  # noqa: F401  (its own dependencies: fastapi, starlette, ...)
    except ImportError as error:
        return f"{RAY_MISSING} ({error})"
    return None


def build_app(config: str, weights: str | None, threads: int) -> Any:
    """The Ray Serve application: one replica of the torch fp32 network for ``config``."""
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=RAY_MAX_ONGOING,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    class RayPose:
        """Decode, crop (the project's functions), batched torch forward, keypoints."""

        def __init__(self, config: str, weights: str | None, threads: int) -> None:
            import torch

            from omnipose.service.loading import load_pose_model

            torch.set_num_threads(threads)
            loaded = load_pose_model(weights, config, "cpu", "fp32", flip_test=False)
            self.estimator = loaded.estimator
            self.network = self.estimator.model  # the plain torch module, fp32, eval mode

        async def __call__(self, request: Any) -> dict:
            import json

            import cv2
            import numpy as np

            from omnipose.model.crops import crop_persons
            from omnipose.model.detection import Detections

            data = await request.body()
            boxes = np.asarray(json.loads(request.query_params["boxes"]),
                               dtype=np.float64).reshape(-1, 4)
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            crops = crop_persons(self.estimator, image, Detections(boxes, np.ones(len(boxes))))
            persons = await self.estimate(crops)
            return {"persons": [{"keypoints": person.keypoints.round(2).tolist(),
                                 "score": person.score} for person in persons]}

        @serve.batch(max_batch_size=RAY_BATCH_SIZE, batch_wait_timeout_s=RAY_BATCH_WAIT_S)
        async def estimate(self, batch: list) -> list:
            import torch

            with torch.inference_mode():
                heatmaps = self.network(torch.cat([crops.inputs for crops in batch]))
            results, offset = [], 0
            for crops in batch:
                results.append(self.estimator.decode(heatmaps[offset:offset + len(crops)], crops))
                offset += len(crops)
            return results

    return RayPose.bind(config, weights, threads)


@contextlib.contextmanager
def ray_pose_server(config: str, weights: str | None, threads: int, num_cpus: int,
                    port: int) -> Iterator[str]:
    """Ray (``num_cpus`` CPUs) with the deployment on ``127.0.0.1:port``; yields its URL
    (POST the image there with ``?boxes=[[x, y, w, h], ...]``). Ray is shut down on leaving."""
    import ray
    from ray import serve

    # Workers inherit the environment: no usage reporting (no network at run time), the
    # project importable, the same OpenMP wait policy as the service (bench/load.py set it).
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, object_store_memory=128 * 1024 * 1024)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own Serve messages
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(config, weights, threads), name="pose", route_prefix=ROUTE)
        yield f"http://127.0.0.1:{port}{ROUTE}"
    finally:
        ray.shutdown()  # Serve's actors go with the cluster this process started
