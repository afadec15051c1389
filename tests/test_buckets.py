"""Fixed batch-size buckets (CUDA graphs on a GPU): padding never changes a crop's heatmaps.

On the CPU the buckets run eagerly with the same padding and splitting as the graph replays; the
capture itself needs a GPU (bench/gpu.sh checks it there).
"""

from __future__ import annotations

import torch

from omnipose.model.buckets import BucketedForward, bucket_sizes
from omnipose.model.configs import get_config
from omnipose.model.network import build_model
from omnipose.model.topdown import TopDownPoseEstimator

CONFIG = get_config("coco-w8-96x64")


def test_bucket_sizes_are_powers_of_two_up_to_the_largest() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_padded_buckets_give_each_crop_its_own_heatmaps() -> None:
    torch.manual_seed(0)
    network = build_model(CONFIG).eval()
    calls: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return network(x)

    bucketed = BucketedForward(counted, torch.zeros(1, 3, *CONFIG.input_size), [1, 2, 4, 8])
    bucketed.warm_up()
    assert calls == [1, 2, 4, 8]
    calls.clear()
    crops = torch.randn(19, 3, *CONFIG.input_size)
    with torch.inference_mode():
        for count in (1, 3, 5, 19):  # 19 > the largest bucket: pieces of 8, 8 and 3 (-> 4)
            torch.testing.assert_close(
                bucketed(crops[:count]), network(crops[:count]), atol=1e-5, rtol=1e-5
            )
    assert calls == [1, 4, 8, 8, 8, 4]


def test_estimator_with_buckets_equals_the_plain_estimator() -> None:
    torch.manual_seed(0)
    network = build_model(CONFIG)
    plain = TopDownPoseEstimator(network, CONFIG, device="cpu", flip_test=True)
    expected = plain.forward(crops := torch.randn(3, 3, *CONFIG.input_size))
    assert plain.use_buckets(8) == [1, 2, 4, 8]
    torch.testing.assert_close(plain.forward(crops), expected, atol=1e-5, rtol=1e-5)
