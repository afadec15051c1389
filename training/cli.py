"""Command-line entry points: ``omnipose train``, ``eval``, ``export`` and ``quantize``.

The main CLI registers these with :func:`add_train_parser`, :func:`add_eval_parser` and
:func:`add_export_parser`; each sets ``func`` to a handler that returns an exit code. User errors
(unknown recipe, missing data, missing or unusable weights, bad overrides) print one line on
stderr and return 2 instead of a traceback. ``python -m omnipose.training.cli`` runs the same
commands without the service CLI.

Under ``torchrun`` every process runs the same command; see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USER_ERROR_EXIT = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from omnipose.model.checkpoint import CheckpointError
    from omnipose.training.config import ConfigError
    from omnipose.training.engine import TrainingError
    from omnipose.training.records import DataError

    return (ConfigError, DataError, TrainingError, CheckpointError)


def _one_line(error: BaseException) -> str:
    """The useful line of an error; DataLoader workers wrap errors in their traceback text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):  # re-raised from a worker process
        last = lines[-1]
        _, sep, message = last.partition(": ")
        return message if sep else last
    return lines[0]


def _fail(command: str, error: BaseException) -> int:
    print(f"omnipose {command}: error: {_one_line(error)}", file=sys.stderr)
    return USER_ERROR_EXIT


def _collect_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides or [])
    for group in args.set_overrides or []:
        overrides.extend(group)
    return overrides


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="training recipe name (e.g. coco-w48-384x288, synth-w18-128x96) or a .json/.yaml file",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides such as train.epochs=3 data.root=/data/coco",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        nargs="+",
        action="append",
        metavar="KEY=VALUE",
        help="more overrides (same form as the positional ones)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda:LOCAL_RANK when CUDA exists, else cpu), cpu, cuda, cuda:N",
    )


# --- train ----------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> int:
    from omnipose.training.config import load_config

    try:
        init, overrides = _split_init(args.init or [])
        config = load_config(args.config, _collect_overrides(args) + overrides)
        if args.output_dir:
            config.output_dir = args.output_dir
        if init:
            _apply_init(config, init)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
    except _user_errors() as error:
        return _fail("train", error)
    return _run_distributed("train", args.device, lambda context: _train(config, context, args))


def _split_init(values: list[str]) -> tuple[list[str], list[str]]:
    """``--init`` swallows what follows it; give back the KEY=VALUE overrides among them."""
    taken = 2 if values[:1] == ["imagenet"] else 1
    return values[:taken], values[taken:]


def _apply_init(config: Any, values: list[str]) -> None:
    """``--init imagenet FILE`` -> model.pretrained; ``--init FILE`` -> model.init_weights."""
    from omnipose.training.config import ConfigError

    if len(values) == 2 and values[0] == "imagenet":
        config.model.pretrained, config.model.init_weights = values[1], None
    elif len(values) == 1 and values[0] != "imagenet":
        config.model.init_weights, config.model.pretrained = values[0], None
    else:
        raise ConfigError(
            f"--init takes 'imagenet FILE' or one OmniPose checkpoint FILE, got {' '.join(values)}"
        )
    for path in (config.model.pretrained, config.model.init_weights):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--init: file {path} not found")


def _train(config: Any, context: Any, args: argparse.Namespace) -> int:
    from omnipose.training.engine import Trainer

    trainer = Trainer(config, context, resume=args.resume)
    result = trainer.fit()
    if context.is_main:
        print(
            f"done: best val {result.best_metric:.4f} at epoch {result.best_epoch}; "
            f"checkpoints in {result.output_dir} ({result.best_checkpoint.name}, "
            f"{result.last_checkpoint.name})"
        )
    return 0


def _run_distributed(command: str, device: str, body: Any) -> int:
    """Join the torchrun process group (if any), run ``body(context)``, always leave it."""
    from omnipose.training.distributed import cleanup_distributed, init_distributed

    try:
        context = init_distributed(device)
    except (RuntimeError, ValueError) as error:
        return _fail(command, error)
    try:
        return body(context)
    except _user_errors() as error:
        return _fail(command, error)
    except KeyboardInterrupt:
        print(f"omnipose {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train an OmniPose model from a recipe",
        description=(
            "Train from a recipe (see docs/training.md). Runs single-process or under torchrun "
            "(DistributedDataParallel). Writes last.pt every epoch and model_best.pt on a new "
            "best validation metric into the output directory."
        ),
    )
    _add_config_arguments(parser)
    parser.add_argument("--resume", metavar="FILE", help="continue exactly from a last.pt")
    parser.add_argument(
        "--init",
        nargs="+",
        metavar="ARG",
        help=(
            "starting point: 'imagenet FILE' maps ImageNet HRNet classification weights (timm "
            "hrnet_wNN or HRNet-Image-Classification) onto the backbone; 'FILE' fine-tunes from "
            "an OmniPose checkpoint (either head)"
        ),
    )
    parser.add_argument("--output-dir", metavar="DIR", help="where checkpoints and logs go")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.set_defaults(func=run_train)
    return parser


# --- eval -----------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    from omnipose.training.config import load_config

    try:
        overrides = _collect_overrides(args)
        config = load_config(args.config, overrides)
        if args.batch_size is not None:
            config.test.batch_size = args.batch_size
        if args.workers is not None:
            config.data.num_workers = args.workers
        if args.max_images is not None:
            config.data.max_val_images = args.max_images
        if not Path(args.weights).exists():
            raise FileNotFoundError(args.weights)
    except FileNotFoundError as error:
        return _fail("eval", RuntimeError(f"weights file {error.args[0]} not found"))
    except _user_errors() as error:
        return _fail("eval", error)
    return _run_distributed("eval", args.device, lambda context: _evaluate(config, context, args))


def _evaluate(config: Any, context: Any, args: argparse.Namespace) -> int:
    import torch

    from omnipose.model.checkpoint import load_model
    from omnipose.training.evaluate import evaluate_model

    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    model, model_config, _ = load_model(args.weights, config.model.config, context.device)
    split = args.split or config.data.val_split
    result = evaluate_model(
        model,
        config,
        device=context.device,
        context=context,
        boxes_file=args.boxes,
        flip_test=False if args.no_flip else None,
        split=split,
    )
    if context.is_main:
        boxes = args.boxes or config.data.val_boxes or "ground-truth boxes"
        flip = "off" if args.no_flip or not config.test.flip_test else "on"
        print(
            f"{model_config.name} on {config.data.root} {split}: {result.num_images} images, "
            f"{result.num_persons} persons, boxes: {boxes}, flip test {flip}"
        )
        print(result.table())
        if args.results and result.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results).write_text(json.dumps(result.results))
            print(f"results written to {args.results}")
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate weights: COCO OKS AP/AR or MPII PCKh",
        description=(
            "Evaluate as published: flip test, OKS-NMS 0.9, instance rescoring (box score x mean "
            "keypoint confidence above 0.2); COCO AP/AR with pycocotools, MPII PCKh@0.5."
        ),
    )
    _add_config_arguments(parser)
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint to evaluate")
    parser.add_argument(
        "--boxes",
        metavar="DETECTIONS.json",
        help="person detections (COCO results format) instead of ground-truth boxes",
    )
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--split", help="split to evaluate (default: the recipe's val split)")
    parser.add_argument("--batch-size", type=int, help="crops per forward pass")
    parser.add_argument("--workers", type=int, help="image-loading worker processes")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images only")
    parser.add_argument("--results", metavar="FILE", help="write COCO results JSON here")
    parser.set_defaults(func=run_eval)
    return parser


# --- export ---------------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    from omnipose.training.export import export_model, export_onnx_model

    difference = None
    try:
        if args.format == "onnx":
            metadata, difference = export_onnx_model(args.weights, args.out, args.config)
        else:
            metadata = export_model(args.weights, args.out, args.config)
    except _user_errors() as error:
        return _fail("export", error)
    except OSError as error:
        return _fail("export", RuntimeError(f"cannot write {args.out}: {error.strerror}"))
    metrics = metadata.get("metrics") or {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(
        f"exported {metadata['model_config']} to {args.out}" + (f" ({summary})" if summary else "")
    )
    if difference is not None:
        print(f"ONNX Runtime vs PyTorch, batch 1 and 3: largest heatmap difference"
              f" {difference:.2e}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write the serving checkpoint from a training or published checkpoint",
        description=(
            "Write weights + metadata (config, joints, skeleton, flip pairs, input size, training "
            "data, metrics) in the project format that the service loads."
        ),
    )
    parser.add_argument(
        "--weights",
        required=True,
        metavar="FILE",
        help="last.pt / model_best.pt, or a published checkpoint",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="serving checkpoint to write")
    parser.add_argument(
        "--format",
        choices=("checkpoint", "onnx"),
        default="checkpoint",
        help="checkpoint (default: what the service loads) or onnx (dynamic batch, checked"
        " against PyTorch in ONNX Runtime, for ONNX Runtime / TensorRT / Triton)",
    )
    parser.add_argument(
        "--config",
        metavar="NAME",
        help="model config (input size), e.g. coco-w48-256x192; default: the file's own",
    )
    parser.set_defaults(func=run_export)
    return parser


# --- quantize -------------------------------------------------------------------------------------


def _crop_source(images: str | None, annotations: str | None, seed: int, count: int) -> Any:
    from omnipose.training.quantize import CropSource

    if (images is None) != (annotations is None):
        raise ValueError("give both an image folder and its annotations JSON, or neither"
                         " (synthetic)")
    return CropSource(Path(images) if images else None,
                      Path(annotations) if annotations else None, seed, count)


def run_quantize(args: argparse.Namespace) -> int:
    from omnipose.training.quantize import quantize_model

    try:
        calibration = _crop_source(args.calibration_images, args.calibration_annotations,
                                   args.calibration_seed, args.calibration_synth_images)
        held_out = _crop_source(args.held_out_images, args.held_out_annotations,
                                args.held_out_seed, args.held_out_synth_images)
        result = quantize_model(args.weights, args.out, config_name=args.config,
                                calibration=calibration, held_out=held_out,
                                calibration_crops_count=args.calibration_crops)
    except (*_user_errors(), ValueError) as error:
        return _fail("quantize", error)
    except ImportError as error:
        return _fail("quantize", RuntimeError(f"{error}; install the openvino extra"))
    for attempt in result.attempts:
        verdict = "PASS" if attempt.guard.passed else "FAIL: " + "; ".join(
            attempt.guard.failures())
        print(f"{attempt.settings.name}: {attempt.guard.summary()}\n  {verdict}")
    if result.written is None:
        print(f"omnipose quantize: no int8 model passed the guard; nothing usable written"
              f" (figures in {result.rejected})", file=sys.stderr)
        return 1
    chosen = result.attempts[-1]
    print(f"wrote {result.written} ({chosen.settings.name}; fp32 layers:"
          f" {', '.join(chosen.fp32_layers) or 'none'})")
    return 0


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from omnipose.training.quantize import SYNTH_CALIBRATION_SEED, SYNTH_HELD_OUT_SEED

    parser = subparsers.add_parser(
        "quantize",
        help="write a guarded int8 OpenVINO model (NNCF), checked against fp32 on held-out data",
        description=(
            "Calibrate NNCF post-training int8 quantisation (overflow-safe for non-VNNI CPUs) on"
            " person crops cut as the service cuts them, then check the accuracy guard against"
            " fp32 on a held-out set (AP within 0.005, keypoint shift median <= 0.1 and p99 <="
            " 0.5 heatmap px, confidence bias within 0.01), trying fp32 fallbacks in turn. Only a"
            " passing model is written (OUT: model.xml, model.bin, int8.json); serve it with"
            " --backend openvino --int8-model OUT. Exit status 1 when none passes."
        ),
    )
    parser.add_argument("--weights", metavar="FILE",
                        help="checkpoint to quantise (default: the embedded default model)")
    parser.add_argument("--config", metavar="NAME", help="model config (default: the file's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="artifact directory")
    parser.add_argument("--calibration-crops", type=int, default=300, metavar="N",
                        help="person crops to calibrate on (default 300)")
    for role, seed, count in (("calibration", SYNTH_CALIBRATION_SEED, 300),
                              ("held-out", SYNTH_HELD_OUT_SEED, 500)):
        parser.add_argument(f"--{role}-images", metavar="DIR",
                            help=f"{role} image folder (default: synthetic images)")
        parser.add_argument(f"--{role}-annotations", metavar="JSON",
                            help=f"COCO-format person annotations of the {role} images")
        parser.add_argument(f"--{role}-seed", type=int, default=seed, metavar="SEED",
                            help=f"synthetic {role} seed (default {seed})")
        parser.add_argument(f"--{role}-synth-images", type=int, default=count, metavar="N",
                            help=f"synthetic {role} images to render (default {count})")
    parser.set_defaults(func=run_quantize)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnipose", description="OmniPose training tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    add_quantize_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
