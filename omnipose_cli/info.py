"""``omnipose info``: the model configurations with their parameters and MACs."""

from __future__ import annotations

import argparse


def run_info(args: argparse.Namespace) -> int:
    from model.complexity import count_macs, count_parameters
    from model.configs import CONFIGS, get_config
    from model.network import build_model

    def order(name: str) -> tuple:
        return CONFIGS[name].dataset, -CONFIGS[name].width, name

    names = args.configs or sorted(CONFIGS, key=order)
    print(f"{'config':<20} {'joints':>6} {'input':>9} {'heatmap':>8} {'params':>12} {'GMACs':>7}")
    for name in names:
        config = get_config(name)
        network = build_model(config)
        macs = count_macs(network, config.input_size)
        h, w = config.input_size
        hh, hw = config.heatmap_size
        print(
            f"{name:<20} {config.num_joints:>6} {f'{h}x{w}':>9} {f'{hh}x{hw}':>8}"
            f" {count_parameters(network):>12,} {macs / 1e9:>7.2f}"
        )
    return 0


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="list model configurations with parameters and MACs")
    p.add_argument("configs", nargs="*", metavar="CONFIG", help="configs to show (default: all)")
    p.set_defaults(func=run_info)
