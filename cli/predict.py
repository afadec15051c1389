"""``omnipose predict``: estimate poses in image files and write COCO-format results.

Runs the service's pipeline (:class:`omnipose.model.predictor.PosePredictor`: the same model,
detector, person selection, crops and decoding), in one process without batching across requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from omnipose.cli.errors import CliError
from omnipose.model.detection import DETECTOR_KINDS, build_detector
from omnipose.model.predictor import PosePredictor
from omnipose.service.boxes import BoxError, parse_boxes
from omnipose.service.images import read_image_file
from omnipose.service.schemas import numeric_image_id


def load_boxes_file(path: Path, images: Sequence[Path]) -> dict[Path, np.ndarray]:
    """Boxes per image from ``--boxes``: a list (one image) or an object keyed by file name."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"--boxes {path}: cannot read file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--boxes {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, list):
        if len(images) != 1:
            raise CliError(
                f"--boxes {path} holds a single list of boxes but {len(images)} images were given;"
                " use an object mapping image file names to box lists"
            )
        return {images[0]: parse_boxes(data)}
    if not isinstance(data, dict):
        raise CliError(f"--boxes {path}: expected a list of boxes or an object of such lists")
    result = {}
    for image in images:
        key = next((k for k in (str(image), image.name) if k in data), None)
        if key is None:
            raise CliError(f"--boxes {path} has no entry for image {image.name}")
        try:
            result[image] = parse_boxes(data[key])
        except BoxError as exc:
            raise CliError(f"--boxes {path}, image {image.name}: {exc}") from None
    return result


def image_id_for(path: Path, position: int) -> int:
    """COCO image ids are integers: a numeric file stem (as COCO names files), else the position."""
    number = numeric_image_id(path.stem)
    return position if number is None else number


def run_predict(args: argparse.Namespace) -> int:
    from omnipose.model.render import draw_poses
    from omnipose.service.loading import UNTRAINED_WARNING, load_pose_model

    images = [Path(p) for p in args.images]
    boxes_by_image = load_boxes_file(Path(args.boxes), images) if args.boxes else {}
    loaded = load_pose_model(
        args.weights, args.config, args.device, args.precision, args.flip, args.flip_shift
    )
    if not loaded.trained:
        banner = "!" * 78
        print(f"{banner}\n{UNTRAINED_WARNING}\n{banner}", file=sys.stderr)
    needs_detector = any(image not in boxes_by_image for image in images)
    detector = None
    if needs_detector:
        if args.detector == "none":
            raise CliError("--detector none needs --boxes for every image")
        device = str(loaded.estimator.device)
        detector = build_detector(args.detector, args.detector_weights, device, args.min_box_score)

    results: list[dict] = []
    render_dir = Path(args.render) if args.render else None
    if render_dir:
        render_dir.mkdir(parents=True, exist_ok=True)
    predictor = PosePredictor(loaded.estimator, detector, args.max_persons,
                              args.whole_image_if_no_person)
    for position, path in enumerate(images, start=1):
        image_bgr = read_image_file(path, exif_orientation=args.exif_orientation)
        height, width = image_bgr.shape[:2]
        try:
            boxes = (parse_boxes(boxes_by_image[path].tolist(), width, height)
                     if path in boxes_by_image else None)
            prediction = predictor.predict(image_bgr, boxes)
        except BoxError as exc:
            raise CliError(f"{path.name}: {exc}") from None
        poses = prediction.persons
        image_id = image_id_for(path, position)
        for pose in poses:
            annotation = pose.to_coco(image_id, loaded.keypoints)
            annotation["image_file"] = str(path)
            results.append(annotation)
        note = ("" if prediction.candidates
                else " (no person detected; see --whole-image-if-no-person)")
        print(f"{path.name}: {len(poses)} person(s){note}", file=sys.stderr)
        if render_dir:
            overlay = draw_poses(image_bgr, poses, loaded.keypoints)
            target = render_dir / f"{path.stem}_pose.jpg"
            if not cv2.imwrite(str(target), overlay):
                raise CliError(f"could not write rendered image {target}")
            print(f"  rendered {target}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(
        f"wrote {len(results)} annotation(s) for {len(images)} image(s) to {out}", file=sys.stderr
    )
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="estimate poses in image files and write COCO-format results",
        description="Detect people, estimate their keypoints and write COCO results JSON.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--weights", help="pose checkpoint (default: the embedded default model)")
    p.add_argument("--config", help="model config, e.g. coco-w48-384x288 (see `omnipose info`)")
    p.add_argument(
        "--detector",
        choices=DETECTOR_KINDS,
        default="hog",
        help="person detector (default: hog, OpenCV's offline people detector)",
    )
    p.add_argument("--detector-weights", help="local ultralytics YOLO weights for --detector yolo")
    p.add_argument("--min-box-score", type=float, default=0.25, help="minimum person box score")
    p.add_argument(
        "--boxes",
        help="JSON: a list of [x,y,w,h] boxes (one image) or an object"
        " mapping image file names to such lists; skips detection",
    )
    p.add_argument(
        "--whole-image-if-no-person",
        action="store_true",
        help="use the whole image as one person box when none is detected",
    )
    p.add_argument(
        "--max-persons",
        type=int,
        default=100,
        help="most persons per image: detections beyond it are dropped, lowest score"
        " first; more --boxes than this is an error",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flip test: average with the mirrored crop (default on)",
    )
    p.add_argument(
        "--flip-shift",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="flip test: shift the mirrored heatmaps one pixel, as HRNet does"
        " (default off, as the published OmniPose)",
    )
    p.add_argument(
        "--exif-orientation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn images upright as their EXIF orientation says (default on); boxes"
        " and keypoints then refer to the upright image",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto (default): fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    p.add_argument("--out", required=True, help="results JSON file (COCO results format)")
    p.add_argument("--render", metavar="DIR", help="also write each image with skeletons drawn")
    p.set_defaults(func=run_predict)
