"""The ``synth`` command line: render a synthetic image dataset or video sequences."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from omnipose.training.synth.dataset import generate_dataset
from omnipose.training.synth.pose import POSE_FAMILIES, VIEWS
from omnipose.training.synth.sequences import SEQUENCE_KINDS, generate_sequences


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x256, got {text!r}") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError("image size must be at least 16x16")
    return height, width


def _pose_families(text: str) -> tuple[str, ...]:
    families = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in families if f not in POSE_FAMILIES]
    if not families or unknown:
        choices = ",".join(POSE_FAMILIES)
        named = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown pose family {named}; choose from {choices}")
    return families


def _views(text: str) -> tuple[str, ...]:
    views = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        named = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown view {named}; choose from {','.join(VIEWS)}")
    return views


def _height_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(":"))
    except ValueError:
        message = f"expected LOW:HIGH such as 0.3:0.7, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset root directory")
    parser.add_argument("--images", type=_non_negative, default=1000, help="number of images")
    parser.add_argument("--seed", type=_non_negative, default=0, help="random seed")
    parser.add_argument("--split", default="train", help="split name (default: train)")
    parser.add_argument(
        "--size", type=_image_size, default=None, help="HxW (images 256x256, sequences 240x320)"
    )
    parser.add_argument("--max-people", type=_positive, default=4, help="people per image, max")
    parser.add_argument(
        "--pose-families",
        type=_pose_families,
        default=POSE_FAMILIES,
        metavar="F1,F2",
        help=f"comma-separated subset of: {','.join(POSE_FAMILIES)} (default: all)",
    )
    parser.add_argument(
        "--views",
        type=_views,
        default=VIEWS,
        metavar="V1,V2",
        help="comma-separated subset of: front,side,back (default: all)",
    )
    parser.add_argument(
        "--height-range",
        type=_height_range,
        default=(0.08, 1.3),
        metavar="LOW:HIGH",
        help="person height / image height, log-uniform (default 0.08:1.3)",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes (default: min(4, cpus), one per 16 images for fewer)",
    )
    video = parser.add_argument_group("video sequences (docs/video.md)")
    video.add_argument(
        "--sequences",
        type=_positive,
        default=None,
        metavar="N",
        help="render N video sequences with track ids instead of images",
    )
    video.add_argument("--frames", type=_positive, default=60, help="frames per sequence (60)")
    video.add_argument(
        "--kinds",
        type=_sequence_kinds,
        default=SEQUENCE_KINDS,
        metavar="K1,K2",
        help=f"sequence kinds, cycled: {','.join(SEQUENCE_KINDS)} (default: all)",
    )


def _sequence_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in SEQUENCE_KINDS]
    if not kinds or unknown:
        named = ", ".join(unknown) or repr(text)
        choices = ",".join(SEQUENCE_KINDS)
        raise argparse.ArgumentTypeError(f"unknown sequence kind {named}; choose from {choices}")
    return kinds


def _run_synth(args: argparse.Namespace) -> int:
    if args.sequences:
        if args.frames < 2:
            raise SystemExit("synth: error: --frames must be at least 2 for a sequence")
        paths = generate_sequences(
            args.out,
            args.sequences,
            args.frames,
            args.seed,
            image_size=args.size or (240, 320),
            kinds=args.kinds,
        )
        for path in paths:
            print(path)
        return 0
    path = generate_dataset(
        args.out,
        args.images,
        args.seed,
        split=args.split,
        image_size=args.size or (256, 256),
        max_people=args.max_people,
        workers=args.workers,
        pose_families=args.pose_families,
        height_range=args.height_range,
        views=args.views,
    )
    print(path)
    return 0


def add_synth_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``synth`` on a CLI's subcommands; ``args.func(args)`` then runs it."""
    parser = subparsers.add_parser(
        "synth",
        help="render a synthetic COCO person-keypoints dataset",
        description="Render articulated people with COCO keypoints and occlusion labels.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run_synth)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omnipose.training.synth``: the same options, with the package's description."""
    description = importlib.import_module("omnipose.training.synth").__doc__
    parser = argparse.ArgumentParser(
        prog="python -m omnipose.training.synth", description=description
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_arguments(parser)
    return _run_synth(parser.parse_args(argv))
