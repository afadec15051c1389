"""Tracking, smoothing, pose-guided boxes and tracking metrics (service/tracking.py,
service/track_metrics.py) on synthetic sequences' ground truth; no network involved."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from omnipose.model.persons import merge_guided
from omnipose.model.skeleton import COCO_KEYPOINTS
from omnipose.model.topdown import PersonPose
from omnipose.service.pose_boxes import pose_box
from omnipose.service.smoothing import OneEuroFilter
from omnipose.service.streams import StreamLimitError, StreamRegistry
from omnipose.service.track_metrics import FramePeople, evaluate_sequence, load_ground_truth
from omnipose.service.tracking import (
    PoseTracker,
    TrackedStream,
    TrackingOptions,
)
from omnipose.training import synth

SIGMAS = np.asarray(COCO_KEYPOINTS.sigmas)
SIZE = (160, 208)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("sequences")
    return {
        kind: json.loads(synth.generate_sequence(out, kind, kind, 24, seed=7, image_size=SIZE)
                         .read_text())
        for kind in synth.SEQUENCE_KINDS
    }  # fmt: skip


def _persons(frame: FramePeople, rng: np.random.Generator, noise: float = 0.0) -> list:
    """Ground-truth people as the pose network would report them: labelled joints with high
    confidence, unlabelled ones with none, optional pixel noise."""
    persons = []
    for box, keypoints in zip(frame.boxes, frame.keypoints, strict=True):
        pose = keypoints.copy()
        labelled = pose[:, 2] > 0
        pose[:, :2] += rng.normal(0.0, noise, pose[:, :2].shape) * labelled[:, None]
        pose[:, 2] = np.where(labelled, 0.9, 0.0)
        persons.append(PersonPose(box.copy(), 0.9, pose, 0.9))
    return persons


def _track(truth: list[FramePeople], options: TrackingOptions, noise: float = 0.0):
    rng = np.random.default_rng(0)
    tracker = PoseTracker(SIGMAS, options)
    predicted, smoothed = [], []
    for frame in truth:
        kept = tracker.update(_persons(frame, rng, noise), detector_ran=True).persons
        tracked = [p for p in kept if p.track_id is not None]
        boxes = [pose_box(p.keypoints, 0.2, 0.15) for p in tracked]
        predicted.append(
            FramePeople(
                [p.track_id for p in tracked],
                np.array(boxes).reshape(-1, 4),
                np.array([p.keypoints for p in tracked]).reshape(-1, 17, 3),
            )
        )
        smoothed.append(tracked)
    return predicted, tracker


# --- synthetic sequences ------------------------------------------------------------------
def test_sequences_have_stable_identities_and_flag_crossings(sequences: dict[str, dict]) -> None:
    for kind, annotation in sequences.items():
        images = annotation["images"]
        assert [i["frame_id"] for i in images] == list(range(24))
        assert {i["vid_id"] for i in images} == {kind}
        ids = {a["track_id"] for a in annotation["annotations"]}
        assert ids == {1, 2}
        for a in annotation["annotations"]:
            assert len(a["keypoints"]) == 51 and a["bbox"][2] > 0 and a["bbox"][3] > 0
    assert sequences["cross"]["info"]["crossing_track_ids"] == [1, 2]
    assert sequences["walk"]["info"]["crossing_track_ids"] == []
    # enter_exit: person 1 leaves the frame, person 2 enters it
    seen: dict[int, list[int]] = {i["id"]: [] for i in sequences["enter_exit"]["images"]}
    for a in sequences["enter_exit"]["annotations"]:
        seen[a["image_id"]].append(a["track_id"])
    frames = [sorted(seen[k]) for k in sorted(seen)]
    assert frames[0] == [1] and frames[-1] == [2] and [1, 2] in frames


def test_walkers_move_smoothly(sequences: dict[str, dict]) -> None:
    """The ground truth is smooth motion: a joint moves a few pixels per frame, no jumps."""
    truth = load_ground_truth(sequences["walk"])
    for track_id in (1, 2):
        hips = [f.keypoints[f.ids.index(track_id), synth.L_HIP, :2] for f in truth]
        steps = np.linalg.norm(np.diff(np.array(hips), axis=0), axis=1)
        assert 0.3 < steps.mean() < 6 and steps.max() < 10


def test_sequence_cli_option_writes_sequences(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--sequences", "2", "--frames", "3", "--kinds", "walk",
            "--size", "96x128", "--seed", "4"]  # fmt: skip
    assert synth.main(argv) == 0
    for name in ("walk-00", "walk-01"):
        annotation = json.loads((tmp_path / name / "annotations.json").read_text())
        assert len(annotation["images"]) == 3 and annotation["info"]["kind"] == "walk"
        assert (annotation["images"][0]["height"], annotation["images"][0]["width"]) == (96, 128)
        assert (tmp_path / name / "frames" / "000003.jpg").is_file()


# --- association ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", synth.SEQUENCE_KINDS)
def test_ground_truth_poses_keep_their_identity(sequences: dict[str, dict], kind: str) -> None:
    truth = load_ground_truth(sequences[kind])
    predicted, _ = _track(truth, TrackingOptions(smooth=False), noise=1.0)
    scores = evaluate_sequence(truth, predicted)
    assert scores.id_switches == 0, scores
    # A track starts once its pose is confident (about 10 joints in view): a person walking in
    # is missed for a few frames, which costs enter_exit's short sequence some IDF1.
    assert scores.idf1 > (0.75 if kind == "enter_exit" else 0.9), scores


def test_swapped_identities_are_counted_as_switches() -> None:
    """The metric can fail: predictions whose ids swap halfway lose IDF1 and count switches."""
    box_a, box_b = np.array([[0, 0, 10, 20]], float), np.array([[50, 0, 10, 20]], float)
    kp = np.full((1, 17, 3), 2.0)  # labelled joints
    truth = [FramePeople([1, 2], np.concatenate([box_a, box_b]), np.full((2, 17, 3), 2.0))] * 10
    good = [FramePeople([7, 8], np.concatenate([box_a, box_b]), np.zeros((2, 17, 3)))] * 10
    swapped = good[:5] + [FramePeople([8, 7], np.concatenate([box_a, box_b]),
                                      np.zeros((2, 17, 3)))] * 5  # fmt: skip
    missing = [FramePeople([7], box_a, kp)] * 10
    perfect = evaluate_sequence(truth, good)
    assert perfect.idf1 == 1.0 and perfect.mota == 1.0 and perfect.id_switches == 0
    bad = evaluate_sequence(truth, swapped)
    assert bad.id_switches == 2 and bad.switches_by_gt == {1: 1, 2: 1}
    assert bad.idf1 == pytest.approx(0.5)
    half = evaluate_sequence(truth, missing)
    assert half.mota == pytest.approx(0.5) and half.idf1 == pytest.approx(2 / 3)


def test_oks_matching_follows_keypoints_not_boxes(sequences: dict[str, dict]) -> None:
    """Matching by OKS pairs poses by their joints: exact poses in boxes that overlap the
    ground truth's poorly still match, a pose moved far away does not."""
    truth = load_ground_truth(sequences["walk"])
    narrow = [FramePeople([i + 10 for i in f.ids], f.boxes * [1, 1, 0.4, 1], f.keypoints.copy())
              for f in truth]  # fmt: skip
    assert evaluate_sequence(truth, narrow, match="iou").idf1 == 0.0
    assert evaluate_sequence(truth, narrow, match="oks").idf1 == 1.0
    moved = [FramePeople(f.ids, f.boxes, f.keypoints + np.array([60.0, 0.0, 0.0])) for f in narrow]
    assert evaluate_sequence(truth, moved, match="oks").idf1 == 0.0


def test_tracks_expire_and_state_stays_bounded() -> None:
    """700 frames of people who each stay 20 frames (35 people per slot): the tracker holds
    only recent tracks and its memory does not grow with the stream's length (the 5,000-frame
    run is bench/track_eval.py --memory-frames). Over the 500 frames compared, a leak of 200
    bytes a frame grows the traced memory by about 118 kB; without one it stays within 3 kB."""
    options = TrackingOptions(max_missed=10)
    tracker = PoseTracker(SIGMAS, options)
    template = np.zeros((17, 3))
    template[:, 0] = np.linspace(0, 30, 17)
    template[:, 1] = np.linspace(0, 90, 17)
    template[:, 2] = 0.9

    def frame_persons(t: int) -> list[PersonPose]:
        out = []
        for slot in range(3):
            person_index = (t + 7 * slot) // 20  # a new person in each slot every 20 frames
            pose = template.copy()
            pose[:, 0] += 100 * slot + (person_index % 5) * 300 + (t % 20)
            out.append(PersonPose(np.zeros(4), 0.9, pose, 0.9))
        return out

    sizes = []
    for t in range(700):
        if t == 100:  # traced from here on only: tracing slows every allocation down
            tracemalloc.start()
        tracker.update(frame_persons(t), detector_ran=True)
        assert tracker.num_tracks <= 3 * (1 + math.ceil(options.max_missed / 20) + 1)
        if t in (200, 699):
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert tracker.frame_index == 699
    assert len(tracker._byte.lost_stracks) <= 6 and not tracker._byte.removed_stracks
    assert sizes[1] < sizes[0] + 100_000, sizes  # flat: no per-frame growth


# --- smoothing -------------------------------------------------------------------------------
def test_one_euro_filter_reduces_jitter_and_follows_motion() -> None:
    rng = np.random.default_rng(1)
    still = 50.0 + rng.normal(0, 2.0, (200, 1))
    filt = OneEuroFilter(min_cutoff=1.0, beta=0.0, d_cutoff=1.0)
    out = np.array([filt(x, 1 / 25) for x in still])
    assert np.std(np.diff(out[50:], axis=0)) < 0.3 * np.std(np.diff(still[50:], axis=0))
    # with a speed term, a steady ramp is followed with a small lag
    ramp = np.arange(100, dtype=float)[:, None] * 4.0
    fast = OneEuroFilter(min_cutoff=1.0, beta=0.5, d_cutoff=1.0)
    slow = OneEuroFilter(min_cutoff=1.0, beta=0.0, d_cutoff=1.0)
    lag_fast = abs(ramp[-1] - [fast(x, 1 / 25) for x in ramp][-1])
    lag_slow = abs(ramp[-1] - [slow(x, 1 / 25) for x in ramp][-1])
    assert lag_fast < 0.5 * lag_slow


def test_smoothing_lowers_jitter_of_noisy_tracks(sequences: dict[str, dict]) -> None:
    truth = load_ground_truth(sequences["walk"])
    raw, _ = _track(truth, TrackingOptions(smooth=False), noise=3.0)
    smooth, _ = _track(truth, TrackingOptions(smooth=True), noise=3.0)
    a, b = evaluate_sequence(truth, raw), evaluate_sequence(truth, smooth)
    assert b.jitter_px < 0.5 * a.jitter_px, (a, b)
    assert b.keypoint_error_px < a.keypoint_error_px + 1.0


def test_smoothing_never_mixes_tracks() -> None:
    """Two people whose poses stay put: each track's filtered pose stays on its own person."""
    tracker = PoseTracker(SIGMAS, TrackingOptions(smooth=True))
    pose = np.zeros((17, 3))
    pose[:, 0], pose[:, 1], pose[:, 2] = np.linspace(0, 30, 17), np.linspace(0, 90, 17), 0.9
    for _ in range(10):
        left = PersonPose(np.zeros(4), 0.9, pose.copy(), 0.9)
        right_pose = pose.copy()
        right_pose[:, 0] += 200
        right = PersonPose(np.zeros(4), 0.9, right_pose, 0.9)
        out = tracker.update([right, left], detector_ran=True).persons
    by_x = sorted(out, key=lambda p: p.keypoints[0, 0])
    np.testing.assert_allclose(by_x[0].keypoints[:, :2], pose[:, :2], atol=1e-6)
    np.testing.assert_allclose(by_x[1].keypoints[:, 0], pose[:, 0] + 200, atol=1e-6)
    assert by_x[0].track_id != by_x[1].track_id


# --- pose-guided boxes ----------------------------------------------------------------------
def test_detector_runs_every_n_frames_and_when_a_track_is_lost(sequences) -> None:
    truth = load_ground_truth(sequences["walk"])
    tracker = PoseTracker(SIGMAS, TrackingOptions(detect_every=4))
    rng = np.random.default_rng(0)
    ran = []
    for frame in truth[:12]:
        planned = tracker.plan(*SIZE[::-1])
        ran.append(planned is None)
        if planned is not None:  # guided boxes cover the people of this frame
            boxes, _ = planned
            assert len(boxes) == len(frame.ids)
        tracker.update(_persons(frame, rng), detector_ran=ran[-1])
    assert ran == [True, False, False, False] * 3
    # a person coming back with no confident joints is lost: the detector runs next
    lost = _persons(truth[12], rng)
    lost[0].keypoints[:, 2] = 0.05
    tracker.update(lost, detector_ran=False)
    assert tracker.plan(*SIZE[::-1]) is None


def _one_person(x: float, y: float, height: float = 80.0) -> PersonPose:
    """A standing person's pose: 17 confident joints spread over ``height`` pixels, the joints'
    extent 0.35 x as wide as tall; its detector box sits lower than the joints' centre (feet
    below the ankles), as real boxes do."""
    pose = np.zeros((17, 3))
    pose[:, 0] = x + np.linspace(-0.175, 0.175, 17) * height
    pose[:, 1] = y + np.linspace(-0.5, 0.5, 17) * height
    pose[:, 2] = 0.9
    box = np.array([x - 0.3 * height, y - 0.55 * height, 0.6 * height, 1.2 * height])
    box[1] += 0.08 * height  # the box's centre lies below the joints' centre
    return PersonPose(box, 0.9, pose, 0.9)


def test_guided_crops_sit_around_the_pose_as_the_detector_box_did() -> None:
    """A guided crop is placed and sized as the detector's box was around the same pose (the
    track's CropFit), not centred on the joints: a crop centred on the joints is off-centre on
    the body, and the poses drift from crop to crop."""
    tracker = PoseTracker(SIGMAS, TrackingOptions(detect_every=10, smooth=False, guide_fit=True))
    person = _one_person(100, 80)
    detector_box = person.bbox.copy()
    tracker.update([person], detector_ran=True)
    planned = tracker.plan(*SIZE[::-1])
    assert planned is not None
    np.testing.assert_allclose(planned[0], [detector_box], atol=1e-6)
    # the guided frame's pose moved and shrank a little: the crop follows its centre with the
    # detector box's offset and scales with it
    moved = _one_person(104, 80, height=76.0)
    moved.bbox = planned[0][0].copy()
    tracker.update([moved], detector_ran=False)
    planned = tracker.plan(*SIZE[::-1])
    assert planned is not None
    expected = _one_person(104, 80, height=76.0).bbox
    velocity = planned[0][0][:2] - expected[:2]  # the Kalman filter's motion, under 4 px
    np.testing.assert_allclose(planned[0][0][2:], expected[2:], atol=1e-6)
    assert np.all(np.abs(velocity) < 4.0)


def test_guided_crops_fall_back_to_the_pose_margin_at_the_image_edge() -> None:
    """Near the edge the detector's box is cut by the image (and the person may be leaving),
    so the crop is the joints' extent grown by ``guide_margin``, as it is by default."""
    for options, person in (
        (TrackingOptions(detect_every=10, smooth=False, guide_fit=True), _one_person(20, 80)),
        (TrackingOptions(detect_every=10, smooth=False), _one_person(100, 80)),
    ):
        tracker = PoseTracker(SIGMAS, options)
        tracker.update([person], detector_ran=True)
        planned = tracker.plan(*SIZE[::-1])
        assert planned is not None
        expected = pose_box(person.keypoints, 0.2, options.guide_margin)
        x1, y1 = max(expected[0], 0.0), max(expected[1], 0.0)
        assert planned[0][0][:2] == pytest.approx([x1, y1], abs=1e-6)
        assert planned[0][0][3] == pytest.approx(expected[3], abs=1e-6)


def test_detector_keeps_running_while_a_lost_person_is_hidden() -> None:
    """A person lost where another stands is probably hidden behind them: the detector runs on
    every frame until they are found again. One lost in the open (a detector miss) or who
    walked out of the image does not keep it running."""
    hidden = PoseTracker(SIGMAS, TrackingOptions(detect_every=50, smooth=False))
    for _ in range(3):  # two confirmed tracks, close together
        hidden.update([_one_person(60, 80), _one_person(90, 80)], detector_ran=True)
    for _ in range(4):  # the second is behind the first: not estimated any more
        hidden.update([_one_person(60, 80)], detector_ran=True)
        assert hidden.plan(*SIZE[::-1]) is None

    apart = PoseTracker(SIGMAS, TrackingOptions(detect_every=50, smooth=False))
    for _ in range(3):
        apart.update([_one_person(60, 80), _one_person(150, 80)], detector_ran=True)
    apart.update([_one_person(60, 80)], detector_ran=True)
    assert apart.plan(*SIZE[::-1]) is None  # just lost: the detector looks once
    apart.update([_one_person(60, 80)], detector_ran=True)
    assert apart.plan(*SIZE[::-1]) is not None  # not hidden by anyone: guided frames resume

    walker = PoseTracker(SIGMAS, TrackingOptions(detect_every=50, smooth=False))
    for x in range(60, -70, -6):  # the second walks out to the left
        walker.update([_one_person(150, 80), _one_person(x, 80)], detector_ran=True)
    for _ in range(3):
        walker.update([_one_person(150, 80)], detector_ran=True)
    assert walker.plan(*SIZE[::-1]) is not None


def test_detector_runs_while_two_people_overlap() -> None:
    """Two people whose boxes overlap share each other's crops: a guided pose could move onto
    the other person and take the track with it, so the detector runs until they part."""
    tracker = PoseTracker(SIGMAS, TrackingOptions(detect_every=50, smooth=False, overlap_iou=0.0))
    for x in (40, 44, 48):
        tracker.update([_one_person(x, 80), _one_person(160 - x, 80)], detector_ran=True)
    assert tracker.plan(*SIZE[::-1]) is not None  # 64 px apart: guided
    for x in (52, 56, 60, 64):  # 32 px apart: their boxes overlap
        tracker.update([_one_person(x, 80), _one_person(160 - x, 80)], detector_ran=True)
    assert tracker.plan(*SIZE[::-1]) is None


def test_a_track_found_again_restarts_its_smoothing() -> None:
    """A track missed for some frames gets a fresh filter: the stale one would pull its pose
    back to where the person was last seen."""
    tracker = PoseTracker(SIGMAS, TrackingOptions(detect_every=1, smooth=True))
    for x in (60, 62, 64):
        tracker.update([_one_person(x, 80)], detector_ran=True)
    for _ in range(3):
        tracker.update([], detector_ran=True)
    back = _one_person(74, 80)
    raw = back.keypoints.copy()
    kept = tracker.update([back], detector_ran=True).persons
    assert kept[0].track_id is not None
    np.testing.assert_allclose(kept[0].keypoints, raw)


def test_pose_box_covers_the_joints_with_a_margin() -> None:
    keypoints = np.array([[10, 10, 0.9], [20, 110, 0.9], [500, 500, 0.1]], float)
    box = pose_box(keypoints, threshold=0.2, margin=0.1)
    x, y, w, h = box
    assert x < 10 and y < 10 and x + w > 20 and y + h > 110
    assert w >= 0.35 * 100 and h == pytest.approx(120)  # a thin pose still gets a body's width
    assert pose_box(keypoints[[0, 2]], 0.2, 0.1) is None


def test_merge_guided_keeps_missed_people_only() -> None:
    detected = (np.array([[0, 0, 10, 20]], float), np.array([0.8]))
    guided = (np.array([[1, 1, 10, 20], [50, 0, 10, 20]], float), np.array([0.7, 0.6]))
    boxes, scores = merge_guided(detected, guided, max_boxes=10)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 20], [50, 0, 10, 20]])
    np.testing.assert_allclose(scores, [0.8, 0.6])
    assert len(merge_guided(detected, guided, max_boxes=1)[0]) == 1


# --- client streams --------------------------------------------------------------------------
def test_stream_registry_is_bounded_and_expires_idle_streams(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("omnipose.service.tracking.time.monotonic", lambda: clock[0])
    registry = StreamRegistry(max_streams=2, idle_s=10.0)
    first = registry.acquire("a", lambda: TrackedStream(PoseTracker(SIGMAS)))
    assert registry.acquire("a", lambda: pytest.fail("reused")) is first
    registry.acquire("b", lambda: TrackedStream(PoseTracker(SIGMAS)))
    with pytest.raises(StreamLimitError, match="limit is 2"):
        registry.acquire("c", lambda: TrackedStream(PoseTracker(SIGMAS)))
    clock[0] += 11.0  # both idle too long: expired, room again
    registry.acquire("c", lambda: TrackedStream(PoseTracker(SIGMAS)))
    assert "a" not in registry and "b" not in registry and len(registry) == 1
    assert registry.release("c") and not registry.release("c") and len(registry) == 0


def test_registry_never_expires_a_stream_with_a_frame_in_flight(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("omnipose.service.tracking.time.monotonic", lambda: clock[0])
    registry = StreamRegistry(max_streams=4, idle_s=10.0)

    async def scenario() -> None:
        busy = registry.acquire("busy", lambda: TrackedStream(PoseTracker(SIGMAS)))
        registry.acquire("idle", lambda: TrackedStream(PoseTracker(SIGMAS)))
        async with busy.lock:  # a frame of "busy" is being processed
            clock[0] += 11.0
            registry.acquire("new", lambda: TrackedStream(PoseTracker(SIGMAS)))
            assert "busy" in registry and "idle" not in registry
            assert registry.acquire("busy", lambda: pytest.fail("replaced")) is busy

    asyncio.run(scenario())


def test_tracking_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="detect_every"):
        TrackingOptions(detect_every=0)
    with pytest.raises(ValueError, match="min_cutoff"):
        TrackingOptions(min_cutoff=0)
    with pytest.raises(ValueError, match="beta"):
        TrackingOptions(beta=-1)


def test_track_ids_on_the_first_frame_at_once_later_arrivals_once_confirmed() -> None:
    """docs/video.md's rule (ByteTrack's): the people of a stream's first frame get ids at once;
    a person who appears later gets one on the next frame that finds them again."""
    tracker = PoseTracker(SIGMAS, TrackingOptions(smooth=False))
    ids = lambda persons: [p.track_id for p in persons]  # noqa: E731
    first = tracker.update([_one_person(50, 80), _one_person(150, 80)], detector_ran=True)
    assert None not in ids(first.persons) and len(set(ids(first.persons))) == 2
    second = tracker.update([_one_person(50, 80), _one_person(150, 80)], detector_ran=True)
    assert ids(second.persons) == ids(first.persons)
    arrival = [_one_person(50, 80), _one_person(150, 80), _one_person(100, 120)]
    assert ids(tracker.update(arrival, detector_ran=True).persons)[2] is None
    again = [_one_person(50, 80), _one_person(150, 80), _one_person(100, 120)]
    confirmed = ids(tracker.update(again, detector_ran=True).persons)
    assert confirmed[2] is not None and confirmed[2] not in ids(first.persons)
