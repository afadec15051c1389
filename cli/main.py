"""The ``omnipose`` command: predict, info, serve, and the training commands.

Each subcommand's parser lives with its code and is imported only for the subcommand that runs,
so ``omnipose train`` never imports the service (FastAPI, gRPC, detectors) and ``omnipose serve``
never imports the training code. ``omnipose --help`` lists every subcommand without importing
any of them.

User errors (a bad image, a wrong weights file, malformed boxes) end with a one-line message on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NamedTuple

from omnipose.cli.errors import EXIT_USER_ERROR, CliError


class Subcommand(NamedTuple):
    module: str  # imported only when this subcommand runs
    add_parser: str  # the function in ``module`` that adds the subcommand's parser
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "predict": Subcommand(
        "omnipose.cli.predict",
        "add_predict_parser",
        "estimate poses in image files and write COCO-format results",
    ),
    "info": Subcommand(
        "omnipose.cli.info", "add_info_parser", "list model configurations with parameters and MACs"
    ),
    "serve": Subcommand(
        "omnipose.service.server", "add_serve_parser", "run the REST + gRPC pose service"
    ),
    "synth": Subcommand(
        "omnipose.training.synth.cli",
        "add_synth_parser",
        "render a synthetic COCO person-keypoints dataset",
    ),
    "train": Subcommand(
        "omnipose.training.cli", "add_train_parser", "train an OmniPose model from a recipe"
    ),
    "eval": Subcommand(
        "omnipose.training.cli", "add_eval_parser", "evaluate weights: COCO OKS AP/AR or MPII PCKh"
    ),
    "export": Subcommand(
        "omnipose.training.cli",
        "add_export_parser",
        "write the serving checkpoint from a training or published checkpoint",
    ),
    "quantize": Subcommand(
        "omnipose.training.cli",
        "add_quantize_parser",
        "write a guarded int8 OpenVINO model, checked against fp32 on held-out data",
    ),
}


def _requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser for ``command``; the other subcommands are listed by name and help only.

    ``command`` None builds every subcommand's full parser (for documentation and tests).
    """
    parser = argparse.ArgumentParser(
        prog="omnipose", description="OmniPose multi-person pose estimation: predict, serve, train."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, sub in SUBCOMMANDS.items():
        if command is None or name == command:
            getattr(importlib.import_module(sub.module), sub.add_parser)(subparsers)
        else:
            subparsers.add_parser(name, help=sub.help)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the user asked for something impossible (imported when one happens)."""
    from omnipose.model.checkpoint import CheckpointError
    from omnipose.model.detection import DetectorError
    from omnipose.service.boxes import BoxError
    from omnipose.service.images import ImageError

    return (ImageError, CheckpointError, DetectorError, BoxError, ValueError, OSError)


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that the training commands' ``KEY=VALUE`` overrides may
    also follow options (``eval NAME --weights FILE data.root=DIR``): argparse fills the
    positionals in one run, so overrides after an option would otherwise be refused."""
    args, extras = parser.parse_known_args(argv)
    overrides = [word for word in extras if "=" in word and not word.startswith("-")]
    if extras and (overrides != extras or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _requested_command(argv)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parse_arguments(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"omnipose {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"omnipose {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
