"""Tracking, smoothing and pose-guided boxes on synthetic sequences with ground truth.

Renders sequences with ``omnipose.training.synth`` (or reads ``--sequences DIR``), runs the video
pipeline in-process (detector, the pose model, service.tracking) in several modes and prints, per
mode: MOTA, IDF1, identity switches (all people, and people who never cross another), keypoint
jitter (mean frame-to-frame acceleration) next to the ground truth's own, mean keypoint error, and
frames per second end to end (decode, detector, crops, network, decoding, tracking).

    .venv/bin/python bench/track_eval.py --sequences-per-kind 2 --frames 60
    .venv/bin/python bench/track_eval.py --speed-frames 300       # the 300-frame speed run

Modes: ``every`` (detector on every frame), ``guided`` (detector every ``--detect-every``
frames, pose-guided boxes in between), each with and without One-Euro smoothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("YOLO_OFFLINE", "1")

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnipose.model.detection import Detections, HogPersonDetector, PersonDetector
from omnipose.model.predictor import PosePredictor
from omnipose.service.loading import load_pose_model
from omnipose.service.pose_boxes import pose_box
from omnipose.service.track_metrics import (
    MIN_SCORED_JOINTS,
    FramePeople,
    evaluate_sequence,
    load_ground_truth,
)
from omnipose.service.tracking import PoseTracker, TrackingOptions
from omnipose.training import synth

MAX_PERSONS = 100


def run_sequence(
    estimator, detector: PersonDetector, frames: list[np.ndarray], options: TrackingOptions
) -> tuple[list[FramePeople], dict]:
    """The stream pipeline over ``frames`` (BGR), as the service runs it (its predictor):
    predictions per frame (tracked persons only, boxes = pose extent) and counts."""
    predictor = PosePredictor(estimator, detector, MAX_PERSONS)
    tracker = PoseTracker(np.asarray(estimator.keypoints.sigmas), options)
    out, detector_frames = [], 0
    started = time.perf_counter()
    for index, image in enumerate(frames):
        if isinstance(detector, GroundTruthDetector):
            detector.frame = index
        prediction = predictor.predict(image, tracker=tracker)
        detector_frames += prediction.detector_ran
        tracked = [p for p in prediction.persons if p.track_id is not None]
        boxes_out = [pose_box(p.keypoints, options.keypoint_threshold, options.box_margin)
                     for p in tracked]  # fmt: skip
        keep = [i for i, b in enumerate(boxes_out) if b is not None]
        out.append(FramePeople(
            ids=[tracked[i].track_id for i in keep],
            boxes=np.array([boxes_out[i] for i in keep]).reshape(-1, 4),
            keypoints=np.array([tracked[i].keypoints for i in keep]).reshape(len(keep), -1, 3)
            if keep else np.zeros((0, 17, 3)),
        ))  # fmt: skip
    seconds = time.perf_counter() - started
    return out, {"seconds": seconds, "detector_frames": detector_frames,
                 "max_tracks": tracker.num_tracks}  # fmt: skip


def memory_run(sigmas: np.ndarray, frames: int) -> dict:
    """The tracker alone (no network) on ``frames`` frames with three people in view at any
    time, a new person every 20 frames per slot: traced Python memory (tracemalloc) along the
    stream; flat means no per-frame or per-track growth."""
    import gc
    import tracemalloc

    from omnipose.model.topdown import PersonPose

    tracker = PoseTracker(sigmas, TrackingOptions())
    template = np.zeros((len(sigmas), 3))
    template[:, 0], template[:, 1], template[:, 2] = np.linspace(0, 30, len(sigmas)), \
        np.linspace(0, 90, len(sigmas)), 0.9  # fmt: skip
    checkpoints = {frames // 10, frames // 2, frames - 1}
    sizes, tracks = {}, {}
    tracemalloc.start()
    for t in range(frames):
        persons = []
        for slot in range(3):
            person = (t + 7 * slot) // 20
            pose = template.copy()
            pose[:, 0] += 100 * slot + (person % 5) * 300 + (t % 20)
            persons.append(PersonPose(np.zeros(4), 0.9, pose, 0.9))
        tracker.update(persons, detector_ran=True)
        if t in checkpoints:
            gc.collect()
            sizes[t + 1] = tracemalloc.get_traced_memory()[0]
            tracks[t + 1] = tracker.num_tracks
    tracemalloc.stop()
    for frame, size in sorted(sizes.items()):
        print(
            f"memory after {frame} frames: {size / 1024:.0f} KiB traced, {tracks[frame]} tracks"
            " held"
        )
    return {"traced_bytes": sizes, "tracks_held": tracks}


class GroundTruthDetector(PersonDetector):
    """A perfect person detector for one sequence: the ground-truth boxes of the people with at
    least MIN_SCORED_JOINTS joints in view, frame by frame. It separates what the tracker and
    the pose model do from what a weak detector (HOG on rendered people) misses."""

    name = "ground-truth"

    def __init__(self, truth: list[FramePeople]) -> None:
        self.truth, self.frame = truth, 0

    def detect_batch(self, images_bgr):
        out = []
        for _ in images_bgr:
            people = self.truth[self.frame]
            keep = (people.keypoints[:, :, 2] > 0).sum(axis=1) >= MIN_SCORED_JOINTS
            out.append(Detections(people.boxes[keep], np.full(int(keep.sum()), 0.9)))
        return out


def load_sequence(path: Path) -> tuple[list[np.ndarray], dict]:
    annotation = json.loads(path.read_text())
    frames = [
        cv2.imread(str(path.parent / image["file_name"]))
        for image in sorted(annotation["images"], key=lambda i: i["frame_id"])
    ]
    return frames, annotation


def parse_options(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """``NAME=VALUE`` overrides of TrackingOptions, each VALUE cast to the field's type."""
    fields = {f.name: f.type for f in dataclasses.fields(TrackingOptions)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            parser.error(f"--option {pair!r}: expected NAME=VALUE with NAME one of"
                         f" {', '.join(fields)}")  # fmt: skip
        kind = {"int": int, "float": float, "float | None": float,
                "bool": lambda v: v.lower() in ("1", "true")}  # fmt: skip
        out[name] = kind[str(fields[name])](value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=Path, help="directory of rendered sequences")
    parser.add_argument("--sequences-per-kind", type=int, default=2)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--detect-every", type=int, default=TrackingOptions().detect_every)
    parser.add_argument("--weights", default=None, help="pose checkpoint (default: embedded)")
    parser.add_argument(
        "--speed-frames",
        type=int,
        default=0,
        help="also time one sequence of this many frames in both modes",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (speed run)")
    parser.add_argument(
        "--speed-size",
        default="480x640",
        help="HxW of the speed run's frames (default VGA, 480x640)",
    )
    parser.add_argument(
        "--memory-frames",
        type=int,
        default=0,
        help="also run the tracker alone for this many frames of people walking"
        " in and out, and print its traced memory along the way",
    )
    parser.add_argument(
        "--detector",
        choices=("hog", "ground-truth"),
        default="hog",
        help="person detector: OpenCV HOG (what the service runs offline) or the sequences'"
        " ground-truth boxes (a perfect detector)",
    )
    parser.add_argument(
        "--modes",
        default="every,every+smooth,guided,guided+smooth",
        help="comma-separated subset of the modes to run",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a TrackingOptions field in every mode (repeatable), e.g. box_margin=0.25",
    )
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)

    model = load_pose_model(args.weights, device="cpu")
    estimator = model.estimator
    detector = HogPersonDetector()
    tmp = tempfile.TemporaryDirectory()
    root = args.sequences or Path(tmp.name)
    if args.sequences is None:
        synth.generate_sequences(root, args.sequences_per_kind * len(synth.SEQUENCE_KINDS),
                                 args.frames, args.seed, progress=False)  # fmt: skip
    paths = sorted(root.glob("*/annotations.json"))
    base = replace(TrackingOptions(), **parse_options(parser, args.option))
    modes = {
        "every": replace(base, detect_every=1, smooth=False),
        "every+smooth": replace(base, detect_every=1, smooth=True),
        "guided": replace(base, detect_every=args.detect_every, smooth=False),
        "guided+smooth": replace(base, detect_every=args.detect_every, smooth=True),
    }
    report: dict = {"modes": {}, "sequences": [p.parent.name for p in paths]}
    print(f"{len(paths)} sequences x {args.frames} frames; detect_every={args.detect_every}")
    print(
        "mode           MOTA   IDF1  IDsw  IDsw(non-crossing)  jitter px (gt)   kp err px"
        "  det frames  fps"
    )
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(modes))
    if unknown:
        parser.error(f"unknown mode {', '.join(unknown)}; choose from {', '.join(modes)}")
    for name, options in modes.items():
        if name not in wanted:
            continue
        rows, seconds, frames_total, det_frames, non_crossing_switches = [], 0.0, 0, 0, 0
        oks_rows = []  # the same predictions matched by keypoints (OKS) instead of boxes
        for path in paths:
            frames, annotation = load_sequence(path)
            truth = load_ground_truth(annotation)
            if args.detector == "ground-truth":
                detector = GroundTruthDetector(truth)
            predicted, counts = run_sequence(estimator, detector, frames, options)
            scores = evaluate_sequence(truth, predicted)
            crossing = set(annotation["info"]["crossing_track_ids"])
            non_crossing_switches += sum(n for gt, n in scores.switches_by_gt.items()
                                         if gt not in crossing)  # fmt: skip
            rows.append(scores)
            oks_rows.append(evaluate_sequence(truth, predicted, match="oks"))
            seconds += counts["seconds"]
            frames_total += len(frames)
            det_frames += counts["detector_frames"]
        figures = {
            "mota": float(np.mean([r.mota for r in rows])),
            "idf1": float(np.mean([r.idf1 for r in rows])),
            "mota_oks": float(np.mean([r.mota for r in oks_rows])),
            "idf1_oks": float(np.mean([r.idf1 for r in oks_rows])),
            "id_switches_oks": int(sum(r.id_switches for r in oks_rows)),
            "id_switches": int(sum(r.id_switches for r in rows)),
            "id_switches_non_crossing": non_crossing_switches,
            "jitter_px": float(np.nanmean([r.jitter_px for r in rows])),
            "gt_jitter_px": float(np.nanmean([r.gt_jitter_px for r in rows])),
            "keypoint_error_px": float(np.nanmean([r.keypoint_error_px for r in rows])),
            "detector_frames": det_frames,
            "frames": frames_total,
            "fps": frames_total / seconds,
            "per_sequence_idf1": [round(r.idf1, 4) for r in rows],
        }
        report["modes"][name] = figures
        f = figures
        print(f"{name:<14} {f['mota']:.3f}  {f['idf1']:.3f}  {f['id_switches']:>4}"
              f"  {non_crossing_switches:>18}  {f['jitter_px']:6.2f} ({f['gt_jitter_px']:.2f})"
              f"  {f['keypoint_error_px']:9.2f}  {det_frames:>5}/{frames_total:<5} "
              f"{f['fps']:5.1f}   OKS-matched: MOTA {f['mota_oks']:.3f} IDF1 {f['idf1_oks']:.3f}"
              f" IDsw {f['id_switches_oks']}")  # fmt: skip
    for plain, smooth in (("every", "every+smooth"), ("guided", "guided+smooth")):
        if plain not in report["modes"] or smooth not in report["modes"]:
            continue
        a, b = report["modes"][plain], report["modes"][smooth]
        print(
            f"{plain}: smoothing cuts jitter {a['jitter_px'] / b['jitter_px']:.2f}x, keypoint"
            f" error {a['keypoint_error_px']:.2f} -> {b['keypoint_error_px']:.2f} px"
        )

    if args.speed_frames:
        speed_dir = Path(tmp.name) / "speed"
        height, width = (int(v) for v in args.speed_size.split("x"))
        path = synth.generate_sequence(
            speed_dir, "speed", "cross", args.speed_frames, args.seed, image_size=(height, width)
        )
        frames, annotation = load_sequence(path)
        truth = load_ground_truth(annotation)
        if args.detector == "ground-truth":
            detector = GroundTruthDetector(truth)
        timing: dict[str, list] = {"every": [], "guided": []}
        idf1 = {}
        for _ in range(args.repeats):
            for name in ("every", "guided"):
                options = replace(modes[name], smooth=True)
                predicted, counts = run_sequence(estimator, detector, frames, options)
                timing[name].append(counts["seconds"])
                idf1[name] = evaluate_sequence(truth, predicted).idf1
                idf1[name + "_oks"] = evaluate_sequence(truth, predicted, match="oks").idf1
        ratios = [e / g for e, g in zip(timing["every"], timing["guided"], strict=True)]
        report["speed"] = {"frames": args.speed_frames, "seconds": timing, "idf1": idf1,
                           "speedup": ratios}  # fmt: skip
        print(f"speed, {args.speed_frames} frames of {args.speed_size}:"
              f" every {min(timing['every']):.1f} s, guided"
              f" {min(timing['guided']):.1f} s, speed-up per repeat "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}; IDF1 every {idf1['every']:.3f},"
              f" guided {idf1['guided']:.3f}")  # fmt: skip
    if args.memory_frames:
        report["memory"] = memory_run(np.asarray(estimator.keypoints.sigmas), args.memory_frames)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
