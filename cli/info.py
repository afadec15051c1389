"""``omnipose info``: the model configurations with their parameters and MACs."""

from __future__ import annotations

import argparse


def run_info(args: argparse.Namespace) -> int:
    from omnipose.model.complexity import config_table

    for line in config_table(args.configs):
        print(line)
    return 0


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="list model configurations with parameters and MACs")
    p.add_argument("configs", nargs="*", metavar="CONFIG", help="configs to show (default: all)")
    p.set_defaults(func=run_info)
