"""``omnipose info``: the model configurations with their parameters and MACs.

Names may be model configs (``coco-w48-384x288``) or training recipes (``synth-w8-96x64``), which
are shown as the network they train. The figures are stored (:mod:`omnipose.model.sizes`), so the
command prints at once without importing torch.
"""

from __future__ import annotations

import argparse

from omnipose.model.configs import EMBEDDED_DEFAULT_CONFIG, UnknownConfigError, get_config


def model_config_name(name: str) -> tuple[str, str | None]:
    """(model config, note): a training recipe's name becomes the network it trains."""
    try:
        return get_config(name).name, None
    except UnknownConfigError:
        from omnipose.training.config import RECIPES

        if name not in RECIPES:
            raise
        config = RECIPES[name].model.config
        return config, f"{name}: the training recipe of {config}"


def run_info(args: argparse.Namespace) -> int:
    from omnipose.model.sizes import config_table, table_config_names

    resolved = [model_config_name(name) for name in args.configs]
    names = [config for config, _ in resolved] or table_config_names()
    notes = [note for _, note in resolved if note]
    if not args.configs:
        notes.append(f"{EMBEDDED_DEFAULT_CONFIG}: the embedded default model "
                     "(model/weights/default.pt, see its MODEL_CARD.md)")
    for line in config_table(names):
        print(line)
    if notes:
        print()
        print("\n".join(notes))
    return 0


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info", help="list model configurations with parameters and MACs",
        description="Model configurations with their parameters and multiply-accumulates per "
                    "person crop. With no CONFIG: every registered configuration and the "
                    "embedded default's.",
    )
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="model configs or training recipes to show (default: all)")
    p.set_defaults(func=run_info)
