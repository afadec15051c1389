"""Video streams: person tracks, pose-guided boxes and One-Euro keypoint smoothing.

Top-down video pipelines (PoseTrack-style systems, ultralytics' ``track`` mode) give every person
a stable identity, skip the detector on most frames and smooth keypoints over time. This module
holds one stream's state for that and nothing else; the engine runs the network.

* **Association** reuses ultralytics' BYTETracker (Kalman-filtered boxes, two-stage matching of
  high- then low-score detections) rather than a hand-written tracker. Its first-stage cost is
  changed to mix box IoU with keypoint OKS between the track's last pose and the new one, which
  keeps identities apart when two boxes overlap but the bodies differ.
* The boxes given to the tracker are always the **pose extent** (confident joints, enlarged),
  whether the frame's crops came from the detector or from the previous poses: one box
  definition for the Kalman filter, whatever the source.
* **Pose-guided boxes** (geometry in :mod:`omnipose.service.pose_boxes`): between detector
  frames each track's next crop box comes from its last pose, moved by the Kalman velocity and
  placed around it as the detector's box was (:class:`CropFit`). The detector runs every
  ``detect_every`` frames and whenever guided boxes are not to be trusted: no track is alive, a
  track was just lost, a lost track is hidden behind someone, or (``overlap_iou``) two people
  overlap.
* **Smoothing** (:mod:`omnipose.service.smoothing`): One-Euro filters (Casiez et al., CHI 2012)
  per track, never shared: one on the pose's centre (mean of its confident joints), one on the
  joints' offsets from it. A walking person's steady translation then passes through the centre
  filter, which follows speed, and the offsets filter can be slow (strong smoothing) without
  making the whole body lag.
* **Bounded state**: tracks unseen for ``max_missed`` frames are dropped, filters with them;
  :class:`omnipose.service.streams.StreamRegistry` bounds the number of client streams and
  expires idle ones.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np

from omnipose.model.detection import box_iou
from omnipose.model.nms import oks_nms, oks_similarity
from omnipose.model.topdown import PersonPose
from omnipose.service.pose_boxes import (
    CropFit,
    box_area,
    box_around,
    clip_box,
    inside_image,
    pose_box,
    pose_extent,
)
from omnipose.service.smoothing import PoseSmoother


@dataclass(frozen=True)
class TrackingOptions:
    """How one stream is tracked. Defaults are the measured ones (bench/track_eval.py)."""

    detect_every: int = 5  # run the detector on every Nth frame (1: every frame)
    max_missed: int = 30  # frames a lost track is kept for re-identification, then dropped
    smooth: bool = True  # One-Euro keypoint filtering per track
    min_cutoff: float = 1.0  # Hz; lower: smoother when still, more lag
    beta: float = 0.01  # speed coefficient; higher: less lag when moving fast
    centre_beta: float = 0.05  # the same for the pose's centre, which moves as the body walks
    d_cutoff: float = 1.0  # Hz; cutoff of the speed estimate
    fps: float = 25.0  # frame rate assumed by the filter (frames carry no timestamps)
    keypoint_threshold: float = 0.2  # joints above it define a pose's extent
    box_margin: float = 0.15  # pose extent grown by this fraction of its size on each side
    # the next frame's crop box around a pose grows by this instead: more context than the
    # person's box, so a joint the last pose placed too far in is still inside the next crop
    # (0.35 chosen on seed-200 sequences over 0.15/0.25/0.5; docs/video.md)
    guide_margin: float = 0.35
    # guided crops placed and sized as the detector's box was around the same pose (CropFit)
    # instead of the pose extent grown by guide_margin. Off by default: with a perfect detector
    # it closes the guided-vs-every-frame IDF1 gap (0.941 -> 0.979 on the test sequences), but
    # with HOG's loose boxes it loses tracks more often, and the extra detector frames cost
    # most of the guided speed-up (docs/video.md)
    guide_fit: bool = False
    # a person whose mean keypoint confidence is below it is not followed by a guided box (it
    # has left the frame, or the crop holds no one), and the detector runs on the next frame
    lost_confidence: float = 0.45
    # when set, the detector runs while two people's boxes overlap more than this (IoU; 0: at
    # all): a crop then holds both, and a guided pose can slide onto the other person, taking
    # the track along. Off by default for its detector cost (docs/video.md); with guide_fit,
    # 0.0 avoided a track swap on the seed-200 sequences that 0.1 did not
    overlap_iou: float | None = None
    duplicate_oks: float = 0.5  # two poses of one frame this similar are one person
    min_visible: float = 0.6  # a guided box mostly outside the image is dropped (leaving)
    oks_weight: float = 0.5  # first-stage cost: (1 - w) x IoU distance + w x OKS distance

    def __post_init__(self) -> None:
        if self.detect_every < 1:
            raise ValueError(f"detect_every must be at least 1, got {self.detect_every}")
        if self.max_missed < 1:
            raise ValueError(f"max_missed must be at least 1, got {self.max_missed}")
        for name in ("min_cutoff", "d_cutoff", "fps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("beta", "centre_beta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(
                    f"{name} must be a non-negative number, got {getattr(self, name)!r}"
                )
        if not 0 <= self.oks_weight <= 1:
            raise ValueError(f"oks_weight must be in [0, 1], got {self.oks_weight!r}")


def pose_confidence(person: PersonPose) -> float:
    """Mean keypoint confidence: how sure the network is that the crop holds this pose."""
    return float(np.mean(person.keypoints[:, 2])) if len(person.keypoints) else 0.0


# --- the tracker ---------------------------------------------------------------------------------
class _PoseDetections:
    """The results-like object ultralytics' trackers read: ``conf``, ``cls``, centre ``xywh``,
    boolean indexing; it also carries the poses for the OKS cost."""

    def __init__(self, boxes_xywh: np.ndarray, scores: np.ndarray, keypoints: np.ndarray) -> None:
        self.boxes = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)
        self.conf = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.cls = np.zeros(len(self.conf), dtype=np.float32)
        self.keypoints = keypoints

    @property
    def xywh(self) -> np.ndarray:
        centre = self.boxes[:, :2] + self.boxes[:, 2:] / 2
        return np.concatenate([centre, self.boxes[:, 2:]], axis=1)

    @property
    def xyxy(self) -> np.ndarray:
        return np.concatenate([self.boxes[:, :2], self.boxes[:, :2] + self.boxes[:, 2:]], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> _PoseDetections:
        return _PoseDetections(self.boxes[index], self.conf[index], self.keypoints[index])


def _byte_tracker_class() -> type:
    """BYTETracker with an IoU + OKS first-stage cost (imported lazily: ultralytics is slow to
    import and only streams need it)."""
    from ultralytics.trackers.byte_tracker import BYTETracker
    from ultralytics.trackers.utils import matching

    class PoseByteTracker(BYTETracker):
        def __init__(self, args: SimpleNamespace, sigmas: np.ndarray, oks_weight: float) -> None:
            super().__init__(args)
            self.sigmas = sigmas
            self.oks_weight = oks_weight
            self.poses: dict[int, np.ndarray] = {}  # track id -> its last pose (J x 3)
            self.centres: dict[int, np.ndarray] = {}  # track id -> its last pose box centre

        def init_track(self, results: _PoseDetections, img: Any = None) -> list:
            tracks = super().init_track(results, img)
            for track, keypoints in zip(tracks, results.keypoints, strict=True):
                track.pose = keypoints
            return tracks

        def get_dists(self, tracks: list, detections: list) -> np.ndarray:
            dists = matching.iou_distance(tracks, detections)
            if self.oks_weight == 0 or not len(tracks) or not len(detections):
                return dists
            poses = np.stack([d.pose for d in detections])
            areas = np.array([d.tlwh[2] * d.tlwh[3] for d in detections])
            for i, track in enumerate(tracks):
                last = self.poses.get(track.track_id)
                if last is None:
                    continue
                # Compare poses where the Kalman filter expects the person now, not where it was:
                # at walking speed a pose moves several of its joints' OKS tolerances per frame.
                moved = last.copy()
                moved[:, :2] += track.xywh[:2] - self.centres[track.track_id]
                last_area = float(track.tlwh[2] * track.tlwh[3])
                oks = oks_similarity(moved, poses, last_area, areas, self.sigmas, 0.2)
                dists[i] = (1 - self.oks_weight) * dists[i] + self.oks_weight * (1.0 - oks)
            return dists

    return PoseByteTracker


@dataclass
class FrameTracking:
    """What tracking did on one frame."""

    detector_ran: bool
    track_ids: list[int | None]  # per person kept, None: not (yet) a confirmed track
    persons: list[PersonPose]  # the frame's persons after duplicate removal


@dataclass
class _Guide:
    """A box for the next frame, from this frame's pose of one person."""

    track_id: int  # negative: a pose not (yet) a confirmed track
    box: np.ndarray  # x, y, w, h: the pose extent grown by guide_margin
    # the box placed by the fit (None: no fit), used when it lies inside the image; at the
    # image's edge the detector box a fit was measured on was cut by the edge, and the person
    # may be walking out: there the extent's own box, which shrinks with the visible body, is
    # the safer guess
    fitted_box: np.ndarray | None
    score: float  # the box score its person had on the last detector frame
    fit: CropFit | None


@dataclass
class _Track:
    filter: PoseSmoother | None
    box_score: float
    last_frame: int


class PoseTracker:
    """One video stream's tracking state. Call :meth:`plan` before a frame (which boxes to
    estimate, or None: run the detector) and :meth:`update` with the frame's persons after it.
    A stream's frames are processed one after another; a lock still guards the state, because
    a frame cancelled by its deadline may finish its update on a worker thread while the next
    frame plans."""

    def __init__(self, sigmas: np.ndarray, options: TrackingOptions | None = None) -> None:
        self.options = options or TrackingOptions()
        o = self.options
        args = SimpleNamespace(track_high_thresh=0.5, track_low_thresh=0.2,
                               new_track_thresh=0.5, track_buffer=o.max_missed,
                               match_thresh=0.8, fuse_score=False)  # fmt: skip
        self._sigmas = np.asarray(sigmas, dtype=np.float64)
        self._byte = _byte_tracker_class()(args, self._sigmas, o.oks_weight)
        self._tracks: dict[int, _Track] = {}
        self.frame_index = -1
        self._lost = True  # no track yet: detect
        self._guides: list[_Guide] = []  # the next frame's boxes from this frame's poses
        self._handed_out: list[_Guide] = []  # the guides whose boxes this frame was given
        self._lock = threading.Lock()

    @property
    def num_tracks(self) -> int:
        """Tracks held (alive or lost, not yet expired)."""
        return len(self._tracks)

    def plan(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Boxes (N x 4) and box scores for the next frame from the previous poses, or None when
        the detector must run (every ``detect_every`` frames, no track, a track lost or hidden,
        two people overlapping)."""
        with self._lock:
            next_index = self.frame_index + 1
            if (
                self._lost
                or not self._guides
                or next_index % self.options.detect_every == 0
                or self._lost_in_view(width, height)
            ):
                return None
            return self._guided(width, height)

    def _visible_part(self, box: np.ndarray, width: int, height: int) -> np.ndarray | None:
        """``box`` cut to the image, or None when less than ``min_visible`` of it is inside (a
        person walking out of the picture)."""
        clipped = clip_box(box, width, height)
        if clipped is None or box_area(clipped) < self.options.min_visible * box_area(box):
            return None
        return clipped

    def _lost_in_view(self, width: int, height: int) -> bool:
        """Whether a lost track is hidden behind someone: its predicted box is mostly inside the
        image and overlaps a tracked person's. The detector then looks for it on every frame
        until it is found again, parts from the others, or expires. A person who walked out of
        the image, or whom a weak detector misses in the open, does not count (that would run
        the detector on every frame for as long as the track is kept)."""
        tracked = [t.tlwh for t in self._byte.tracked_stracks if t.is_activated]
        if not tracked:
            return False
        for track in self._byte.lost_stracks:
            box = track.tlwh
            if self._visible_part(box, width, height) is not None and (
                box_iou(box, np.asarray(tracked)).max() > 0
            ):
                return True
        return False

    def guided_boxes(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The pose-guided boxes of the alive tracks (also used on detector frames, to keep the
        people the detector missed)."""
        with self._lock:
            return self._guided(width, height)

    def _guided(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        velocities = {t.track_id: t.mean[4:6] for t in self._byte.tracked_stracks
                      if t.mean is not None}  # fmt: skip
        handed_out = []
        for guide in self._guides:
            box = guide.box
            if guide.fitted_box is not None and inside_image(guide.fitted_box, width, height):
                box = guide.fitted_box
            moved = box.copy()
            velocity = velocities.get(guide.track_id)
            if velocity is not None:
                moved[:2] += velocity  # the Kalman filter's centre motion per frame
            clipped = self._visible_part(moved, width, height)
            if clipped is not None:
                handed_out.append(replace(guide, box=clipped))
        self._handed_out = handed_out
        boxes = np.asarray([g.box for g in handed_out], dtype=np.float64).reshape(-1, 4)
        return boxes, np.asarray([g.score for g in handed_out], dtype=np.float64)

    def update(self, persons: list[PersonPose], detector_ran: bool) -> FrameTracking:
        """Track this frame's persons: duplicates (one person estimated from a detector box and
        a guided box) are removed by OKS-NMS, the rest get track ids (``PersonPose.track_id``)
        and, when asked, smoothed keypoints (in place); the next frame's guided boxes are
        prepared. Returns the persons kept, in :attr:`FrameTracking.persons`."""
        with self._lock:
            return self._update(persons, detector_ran)

    def _update(self, persons: list[PersonPose], detector_ran: bool) -> FrameTracking:
        o = self.options
        self.frame_index += 1
        persons = self._deduplicate(persons)
        handed_out, self._handed_out = self._handed_out, []
        boxes = np.zeros((len(persons), 4))
        guide_boxes = np.zeros((len(persons), 4))
        fitted_boxes: list[np.ndarray | None] = [None] * len(persons)
        fits: list[CropFit | None] = [None] * len(persons)
        usable = np.zeros(len(persons), dtype=bool)
        for i, person in enumerate(persons):
            extent = pose_extent(person.keypoints, o.keypoint_threshold)
            if extent is None:
                continue
            boxes[i], usable[i] = box_around(extent, o.box_margin), True
            fits[i] = self._fit_of(person.bbox, extent, handed_out) if o.guide_fit else None
            guide_boxes[i] = box_around(extent, o.guide_margin)
            fitted_boxes[i] = None if fits[i] is None else fits[i].box(extent)
        # The tracker scores a pose by its keypoint confidence: pose boxes, not detector
        # boxes, are what it follows, and guided frames have no detector score.
        confidence = np.array([pose_confidence(p) for p in persons], dtype=np.float64)
        confidence = np.where(usable, confidence, 0.0)  # a pose without extent cannot be tracked
        keypoints = np.stack([p.keypoints for p in persons]) if persons else np.zeros((0, 0, 3))
        output = self._byte.update(_PoseDetections(boxes, confidence, keypoints))
        # Ended tracks: ultralytics keeps up to 1,000 of them and drops them from its lost pool
        # only on a later frame; drop them now and keep no history (flat memory).
        removed = {t.track_id for t in self._byte.removed_stracks}
        self._byte.lost_stracks = [t for t in self._byte.lost_stracks if t.track_id not in removed]
        self._byte.removed_stracks = []

        track_ids: list[int | None] = [None] * len(persons)
        for row in output.reshape(-1, 8):
            track_ids[int(row[7])] = int(row[4])
        dt = 1.0 / o.fps
        guides: list[tuple[int, np.ndarray, float]] = []
        lost = False
        for i, (person, track_id) in enumerate(zip(persons, track_ids, strict=True)):
            keeps_going = usable[i] and confidence[i] >= o.lost_confidence
            if track_id is None:
                # Not a confirmed track yet: its pose still guides the next frame's box, so one
                # detection is enough to start following someone.
                if keeps_going:
                    guides.append(
                        _Guide(-1 - i, guide_boxes[i], fitted_boxes[i], person.box_score, fits[i])
                    )
                continue
            person.track_id = track_id
            track = self._tracks.get(track_id)
            if track is None:
                track = _Track(self._new_filter(), person.box_score, self.frame_index)
                self._tracks[track_id] = track
            elif track.last_frame != self.frame_index - 1:
                # Found again after missed frames: its filter's value and speed are stale, and
                # would pull the pose back towards where the person was last seen.
                track.filter = self._new_filter()
            track.last_frame = self.frame_index
            if detector_ran:
                track.box_score = person.box_score
            self._byte.poses[track_id] = person.keypoints.copy()  # raw pose: association
            self._byte.centres[track_id] = boxes[i, :2] + boxes[i, 2:] / 2
            if track.filter is not None:
                person.keypoints = track.filter(person.keypoints, dt)
            if keeps_going:
                guides.append(
                    _Guide(track_id, guide_boxes[i], fitted_boxes[i], track.box_score, fits[i])
                )
            else:
                lost = True
        # A track followed by a guided box last frame that has none now is lost too.
        followed = {g.track_id for g in self._guides if g.track_id > 0}
        if followed - {g.track_id for g in guides}:
            lost = True
        self._guides = guides
        if o.overlap_iou is not None and len(guides) > 1 and usable.sum() > 1:
            overlap = box_iou(boxes[usable], boxes[usable])
            np.fill_diagonal(overlap, 0.0)
            lost = lost or bool(overlap.max() > o.overlap_iou)
        self._lost = lost or not guides
        self._expire()
        return FrameTracking(detector_ran, track_ids, persons)

    @staticmethod
    def _fit_of(
        crop_box: np.ndarray, extent: tuple[np.ndarray, np.ndarray], handed_out: list[_Guide]
    ) -> CropFit:
        """How the box a pose was estimated from sat around it: a guided box keeps the fit it
        was built with (fitting to it again would only follow the crop's own drift); any other
        box (the detector's, the client's) is measured against the pose."""
        for guide in handed_out:
            if guide.fit is not None and np.allclose(guide.box, crop_box, atol=1e-3):
                return guide.fit
        return CropFit.measure(crop_box, extent)

    def _deduplicate(self, persons: list[PersonPose]) -> list[PersonPose]:
        if len(persons) < 2:
            return list(persons)
        keypoints = np.stack([p.keypoints for p in persons])
        areas = np.array([box_area(pose_box(p.keypoints, self.options.keypoint_threshold, 0.0))
                          for p in persons])  # fmt: skip
        scores = np.array([pose_confidence(p) for p in persons])
        keep = oks_nms(keypoints, scores, areas, self._sigmas, self.options.duplicate_oks,
                       self.options.keypoint_threshold)  # fmt: skip
        return [persons[i] for i in sorted(keep)]

    def _new_filter(self) -> PoseSmoother | None:
        return PoseSmoother(self.options) if self.options.smooth else None

    def _expire(self) -> None:
        """Drop the state of tracks unseen for longer than ``max_missed`` frames."""
        horizon = self.frame_index - self.options.max_missed
        for track_id in [k for k, t in self._tracks.items() if t.last_frame < horizon]:
            del self._tracks[track_id]
            self._byte.poses.pop(track_id, None)
            self._byte.centres.pop(track_id, None)


# --- client streams ------------------------------------------------------------------------------
@dataclass
class TrackedStream:
    """One stream's tracker and the lock that keeps its frames one at a time, in order."""

    tracker: PoseTracker
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
