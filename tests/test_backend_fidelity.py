"""Every backend serves torch's keypoints: fp32 within 0.01 image px and confidences within 1e-4.

Per backend (torch, onnxruntime, openvino fp32; openvino bf16 where the CPU has native bf16, with
a looser tolerance stated below), on two networks: the embedded default (trained, WASPv2 head)
and the released checkpoint layout (WASPv1 head, ``module.``-prefixed state dict as published,
non-trivial random weights). The persons are the golden crop-transform cases' boxes
(tests/data/reference, computed by the published pipeline) on the bus photo, with flip test on
as the service runs it. Each network is exported once per module; ONNX Runtime and OpenVINO run
the same ONNX export.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench.samples import BUS_JPG
from omnipose.model.checkpoint import load_model
from omnipose.model.configs import ModelConfig
from omnipose.model.network import OmniPose
from omnipose.model.openvino_runtime import import_openvino, openvino_core
from omnipose.model.precision import cpu_has_native_bf16
from omnipose.model.runners import OnnxRuntimeRunner, Runner, TorchRunner
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service import loading
from tests.conftest import randomised

pytest.importorskip("onnxruntime")
try:  # usage telemetry declined (and no sender thread started), as the runner imports it
    openvino = import_openvino()
except ImportError:  # the openvino extra is not installed: its cases skip
    openvino = None

GOLDEN_PATH = Path(__file__).parent / "data" / "reference" / "crop_transforms_golden.json"
KEYPOINT_TOLERANCE_PX = 0.01  # image pixels, fp32 backends against torch fp32
CONFIDENCE_TOLERANCE = 1e-4
# bf16 carries 8 mantissa bits: on the trained default the median keypoint moves at most this
# far (image px) and no confidence by more than BF16_CONFIDENCE_TOLERANCE.
BF16_MEDIAN_SHIFT_PX = 0.5
BF16_CONFIDENCE_TOLERANCE = 0.02
BACKENDS = ["torch", "onnxruntime", "openvino"]


def golden_boxes() -> np.ndarray:
    """The distinct boxes of the golden crop-transform cases that lie inside the bus photo."""
    cases = json.loads(GOLDEN_PATH.read_text())["cases"]
    boxes = sorted({tuple(case["box_xywh"]) for case in cases})
    return np.array([box for box in boxes if box[2] > 32], dtype=np.float32)


def released_layout(folder: Path) -> tuple[torch.nn.Module, ModelConfig]:
    """A WASPv1 network saved as the released checkpoints are, loaded by the project's reader."""
    network = randomised(OmniPose(num_joints=17, width=8, head="waspv1"), seed=4)
    state = {"module." + key: value for key, value in network.state_dict().items()}
    path = folder / "released.pth"
    torch.save({"state_dict": state, "epoch": 210}, path)
    loaded, config, _ = load_model(path, "coco-w8-96x64-waspv1")
    return loaded.eval(), config


class Networks:
    """Each network's reference poses and its runners, built once per module on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._networks: dict[str, tuple[torch.nn.Module, ModelConfig]] = {}
        self._onnx: dict[str, bytes] = {}
        self.image = cv2.cvtColor(cv2.imread(str(BUS_JPG)), cv2.COLOR_BGR2RGB)
        self.boxes = golden_boxes()

    def network(self, name: str) -> tuple[torch.nn.Module, ModelConfig]:
        if name not in self._networks:
            if name == "default":
                loaded = loading.load_pose_model(device="cpu", precision="fp32")
                self._networks[name] = (loaded.estimator.model, loaded.config)
            else:
                self._networks[name] = released_layout(self.folder)
        return self._networks[name]

    def runner(self, name: str, backend: str, precision: str = "fp32") -> Runner:
        network, config = self.network(name)
        if backend == "torch":
            return TorchRunner(network, "cpu", "fp32")
        if name not in self._onnx:
            from omnipose.model.onnx_runtime import export_onnx

            self._onnx[name] = export_onnx(network, config.input_size)
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(self._onnx[name])
        if openvino is None:
            pytest.skip("openvino is not installed (the openvino extra)")
        from omnipose.model.openvino_runtime import OpenVinoRunner

        ov_model = openvino_core().read_model(io.BytesIO(self._onnx[name]))
        return OpenVinoRunner(ov_model, precision)  # type: ignore[arg-type]

    def poses(self, name: str, runner: Runner) -> np.ndarray:
        """Keypoints [N, J, 3] (x, y, confidence) of the golden boxes, flip test on."""
        _, config = self.network(name)
        estimator = TopDownPoseEstimator(runner, config, flip_test=True)
        persons = estimator.estimate(self.image, self.boxes, nms_threshold=None)
        assert len(persons) == len(self.boxes)
        return np.stack([person.keypoints for person in persons])


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Networks:
    return Networks(tmp_path_factory.mktemp("fidelity"))


@pytest.fixture(scope="module")
def reference(networks: Networks) -> dict[str, np.ndarray]:
    return {name: networks.poses(name, networks.runner(name, "torch"))
            for name in ("default", "released")}


@pytest.mark.parametrize("network_name", ["default", "released"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_backend_keypoints_equal_torch(networks: Networks, reference: dict[str, np.ndarray],
                                            backend: str, network_name: str) -> None:
    runner = networks.runner(network_name, backend)
    assert runner.backend == backend and runner.precision == "fp32"
    got, expected = networks.poses(network_name, runner), reference[network_name]
    np.testing.assert_allclose(got[..., :2], expected[..., :2], rtol=0, atol=KEYPOINT_TOLERANCE_PX)
    np.testing.assert_allclose(got[..., 2], expected[..., 2], rtol=0, atol=CONFIDENCE_TOLERANCE)


def test_references_are_not_degenerate(reference: dict[str, np.ndarray]) -> None:
    """Keypoints that differ between persons and joints: a constant output would pass above."""
    for poses in reference.values():
        assert np.unique(poses[..., :2].round(1)).size > poses.shape[1]
        assert poses[..., 2].std() > 1e-3


def test_openvino_bf16_keypoints_close_to_torch(networks: Networks,
                                                reference: dict[str, np.ndarray]) -> None:
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    runner = networks.runner("default", "openvino", "bf16")
    assert runner.precision == "bf16"
    got, expected = networks.poses("default", runner), reference["default"]
    shift = np.linalg.norm(got[..., :2] - expected[..., :2], axis=-1)
    assert np.median(shift) <= BF16_MEDIAN_SHIFT_PX
    assert np.abs(got[..., 2] - expected[..., 2]).max() <= BF16_CONFIDENCE_TOLERANCE
