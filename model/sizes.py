"""Parameters and multiply-accumulates per crop of each model configuration: ``omnipose info``.

Counting them means building the network and tracing a forward pass (seconds per config, and
torch to import), so the figures of the registered configurations and of the embedded default's
are stored here; ``tests/test_network.py`` recounts every one with
:mod:`omnipose.model.complexity`, so a stored figure cannot drift from the network. Any other
configuration is counted when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from omnipose.model.configs import CONFIGS, EMBEDDED_DEFAULT_CONFIG, ModelConfig, get_config

# config name: (parameters, multiply-accumulates of one crop)
STORED_SIZES: dict[str, tuple[int, int]] = {
    "coco-w48-384x288": (68_141_357, 36_959_102_208),
    "coco-w48-256x192": (68_141_357, 16_426_268_928),
    "coco-w48-128x96": (68_141_357, 4_106_568_960),
    "coco-w48-384x288-waspv1": (68_197_613, 37_459_420_416),
    "coco-w48-256x192-waspv1": (68_197_613, 16_648_632_576),
    "coco-w48-128x96-waspv1": (68_197_613, 4_162_159_872),
    "coco-w32-384x288": (30_564_473, 17_955_054_592),
    "coco-w32-256x192": (30_564_473, 7_980_024_832),
    "coco-w32-128x96": (30_564_473, 1_995_006_976),
    "coco-w18-384x288": (9_965_867, 7_425_939_924),
    "coco-w18-256x192": (9_965_867, 3_300_417_924),
    "coco-w18-128x96": (9_965_867, 825_104_724),
    "mpii-w48-256x256": (68_141_308, 21_901_494_528),
    "mpii-w48-256x256-waspv1": (68_197_564, 22_197_979_392),
    "mpii-w32-256x256": (30_564_440, 10_639_901_696),
    "mpii-w18-256x256": (9_965_848, 4_400_483_396),
    "coco-w8-96x64": (2_270_627, 188_454_592),
}


def config_size(config: ModelConfig) -> tuple[int, int]:
    """(parameters, MACs per crop): stored when known, else counted (imports torch)."""
    if config.name in STORED_SIZES:
        return STORED_SIZES[config.name]
    from omnipose.model.complexity import measure_size

    return measure_size(config)


def table_config_names() -> list[str]:
    """What ``omnipose info`` lists by default: the registry, then the embedded default's."""
    return [*CONFIGS, EMBEDDED_DEFAULT_CONFIG]


def config_table(names: Sequence[str] | None = None) -> list[str]:
    """``omnipose info``'s table, header first: one row per config (the default list when
    ``names`` is empty)."""
    lines = [
        f"{'config':<24} {'head':<6} {'joints':>6} {'input':>9} {'heatmap':>8} "
        f"{'params':>12} {'GMACs':>7}"
    ]
    for name in names or table_config_names():
        config = get_config(name)
        params, macs = config_size(config)
        h, w = config.input_size
        hh, hw = config.heatmap_size
        lines.append(
            f"{config.name:<24} {config.head_label:<6} {config.num_joints:>6} {f'{h}x{w}':>9} "
            f"{f'{hh}x{hw}':>8} {params:>12,} {macs / 1e9:>7.2f}"
        )
    return lines
