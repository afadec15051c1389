"""Tests of the synthetic COCO person-keypoints generator (omnipose.training.synth)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from omnipose.model.skeleton import COCO_KEYPOINTS
from omnipose.training import synth

SIZE = (160, 160)  # height, width: small keeps the tests fast
LEFT_RIGHT_PAIRS = [(synth.L_EAR, synth.R_EAR), (synth.L_SHOULDER, synth.R_SHOULDER),
                    (synth.L_HIP, synth.R_HIP), (synth.L_KNEE, synth.R_KNEE)]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate_dataset(out, 12, seed=3, image_size=SIZE, workers=1, progress=False)
    return out


def _keypoints(annotation: dict) -> np.ndarray:
    return np.asarray(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)


# pycocotools' mask decoding trips a numpy 2 deprecation warning inside the library.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_dataset_loads_with_pycocotools_and_labels_are_consistent(dataset: Path) -> None:
    coco = COCO(str(dataset / "annotations" / "person_keypoints_train.json"))
    (category,) = coco.loadCats(coco.getCatIds())
    assert category["name"] == "person"
    assert category["keypoints"] == list(COCO_KEYPOINTS.joint_names)
    assert category["skeleton"] == [[a + 1, b + 1] for a, b in COCO_KEYPOINTS.limbs]
    assert len(coco.getImgIds()) == 12
    height, width = SIZE
    visibilities = []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(str(dataset / "images" / "train" / info["file_name"]))
        assert image is not None and image.shape == (height, width, 3)
        assert (info["height"], info["width"]) == SIZE
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            kp = _keypoints(ann)
            assert kp.shape == (17, 3)
            v = kp[:, 2]
            visibilities.append(v)
            assert set(np.unique(v)) <= {0.0, 1.0, 2.0}
            assert ann["num_keypoints"] == int((v > 0).sum())
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0
            assert np.all(kp[v == 0, :2] == 0)
            labelled = kp[v > 0, :2]
            assert np.all(labelled >= 0)
            assert np.all(labelled[:, 0] <= width - 1) and np.all(labelled[:, 1] <= height - 1)
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= width and y + h <= height
            assert 0 < ann["area"] <= w * h
            # A visible joint lies on the person's visible silhouette, so inside its tight box.
            shown = kp[v == 2, :2]
            assert np.all(shown[:, 0] >= x - 1) and np.all(shown[:, 0] <= x + w)
            assert np.all(shown[:, 1] >= y - 1) and np.all(shown[:, 1] <= y + h)
            # Box and area describe the stored silhouette mask.
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"]
            assert np.allclose(mask_utils.toBbox(coco.annToRLE(ann)), ann["bbox"])
    all_v = np.concatenate(visibilities)
    assert (all_v == 2).sum() > 50, "a dozen images should show many visible joints"
    assert (all_v == 1).sum() > 0, "occluded joints must occur"


def test_people_too_small_to_label_have_no_keypoints(dataset: Path) -> None:
    data = json.loads((dataset / "annotations" / "person_keypoints_train.json").read_text())
    small = [a for a in data["annotations"] if a["area"] < synth.MIN_KEYPOINT_AREA]
    large = [a for a in data["annotations"] if a["area"] >= synth.MIN_KEYPOINT_AREA]
    assert small and large, "the sample should hold both small and large people"
    assert all(a["num_keypoints"] == 0 and not any(a["keypoints"]) for a in small)
    assert any(a["num_keypoints"] > 0 for a in large)


def test_a_few_images_render_without_a_worker_pool(tmp_path: Path, monkeypatch) -> None:
    """A spawned worker's start costs about IMAGES_PER_DEFAULT_WORKER images' rendering: the
    default worker count starts none for fewer images."""
    from omnipose.training.synth import dataset as synth_dataset

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(synth_dataset.mp, "get_context", no_pool)
    count = synth_dataset.IMAGES_PER_DEFAULT_WORKER - 1
    synth.generate_dataset(tmp_path, count, seed=1, image_size=(32, 32), progress=False)
    assert len(list((tmp_path / "images" / "train").iterdir())) == count


def test_same_seed_gives_identical_files_for_any_worker_count(tmp_path: Path) -> None:
    kwargs = {"image_size": (96, 96), "progress": False}
    first = synth.generate_dataset(tmp_path / "a", 4, seed=11, workers=1, **kwargs)
    second = synth.generate_dataset(tmp_path / "b", 4, seed=11, workers=2, **kwargs)
    other = synth.generate_dataset(tmp_path / "c", 4, seed=12, workers=1, **kwargs)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    names = sorted(p.name for p in (tmp_path / "a" / "images" / "train").iterdir())
    assert len(names) == 4
    for name in names:
        a = (tmp_path / "a" / "images" / "train" / name).read_bytes()
        b = (tmp_path / "b" / "images" / "train" / name).read_bytes()
        c = (tmp_path / "c" / "images" / "train" / name).read_bytes()
        assert a == b
        assert a != c


def _front_camera() -> synth.Camera:
    return synth.Camera.create(200, 200, fov_deg=50.0)


def _person_at(camera: synth.Camera, u: float, v: float, depth: float, **kwargs) -> synth.Person:
    return synth.make_person(synth.Pose.neutral(), camera.backproject(u, v, depth), **kwargs)


def test_person_in_front_hides_the_joints_behind_it() -> None:
    camera = _front_camera()
    back = _person_at(camera, 100, 110, 6.0)
    front = _person_at(camera, 112, 110, 4.0)
    alone_back = synth.render_scene(camera, [back])
    alone_front = synth.render_scene(camera, [front])
    both = synth.render_scene(camera, [back, front])
    # A frontal, neutral person on its own shows all 17 joints.
    assert np.all(alone_back.keypoints[0, :, 2] == 2)
    assert np.all(alone_front.keypoints[0, :, 2] == 2)
    assert np.all(both.keypoints[1, :, 2] == 2)
    # Behind the front person, exactly the joints that fall on its silhouette are hidden.
    cols, rows = np.rint(alone_back.keypoints[0, :, :2]).astype(int).T
    covered = alone_front.id_map[rows, cols] == 0
    assert covered.sum() >= 5, "the scene is meant to hide most of the back person"
    assert (~covered).sum() >= 1
    expected = np.where(covered, 1, 2)
    np.testing.assert_array_equal(both.keypoints[0, :, 2], expected)
    # The labelled positions are the projections, hidden or not.
    np.testing.assert_allclose(both.keypoints[0, :, :2], alone_back.keypoints[0, :, :2])


def test_side_view_hides_the_far_side_of_the_body() -> None:
    camera = _front_camera()
    pose = synth.Pose.neutral()
    pose.angles["shoulder_flex"] = np.array([80.0, 80.0])  # arms forward: hanging ones hide hips
    for yaw in (90.0, -90.0):
        person = synth.make_person(pose, camera.backproject(100, 105, 4.0), yaw=yaw)
        render = synth.render_scene(camera, [person])
        _, depth = camera.project(person.joints)
        v = render.keypoints[0, :, 2]
        for left, right in LEFT_RIGHT_PAIRS:
            near, far = (left, right) if depth[left] < depth[right] else (right, left)
            assert depth[far] - depth[near] > 0.1  # really a side view
            assert v[near] == 2, (yaw, COCO_KEYPOINTS.joint_names[near])
            assert v[far] == 1, (yaw, COCO_KEYPOINTS.joint_names[far])


def test_back_view_hides_the_face() -> None:
    camera = _front_camera()
    render = synth.render_scene(camera, [_person_at(camera, 100, 105, 4.0, yaw=180.0)])
    v = render.keypoints[0, :, 2]
    assert np.all(v[[synth.NOSE, synth.L_EYE, synth.R_EYE]] == 1)
    assert np.all(v[[synth.L_SHOULDER, synth.R_SHOULDER, synth.L_ANKLE, synth.R_ANKLE]] == 2)


def test_joints_outside_the_frame_are_zero() -> None:
    camera = _front_camera()
    # Pelvis on the left border and a big person: the right-side joints and the legs leave it.
    person = _person_at(camera, 2, 170, 2.5)
    render = synth.render_scene(camera, [person])
    uv, _ = camera.project(person.joints)
    outside = (uv[:, 0] < 0) | (uv[:, 0] > 199) | (uv[:, 1] < 0) | (uv[:, 1] > 199)
    assert 3 <= outside.sum() <= 14
    kp = render.keypoints[0]
    assert np.all(kp[outside] == 0)
    assert np.all(kp[~outside, 2] > 0)
    np.testing.assert_allclose(kp[~outside, :2], uv[~outside])


def test_visible_joints_are_drawn_on_their_person() -> None:
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(8):
        options = synth.SceneOptions(max_people=3)
        camera, people, props, light = synth.sample_scene(rng, (128, 128), options)
        background = synth.render_background(rng, 128, 128)
        render = synth.render_scene(camera, people, background, props, light)
        bare = np.clip(background + 0.5, 0, 255).astype(np.uint8)
        for index in range(len(people)):
            kp = render.keypoints[index]
            visible = kp[:, 2] == 2
            cols, rows = np.rint(kp[visible, :2]).astype(int).T
            assert np.all(render.id_map[rows, cols] == index)
            difference = np.abs(
                render.image[rows, cols].astype(int) - bare[rows, cols].astype(int)
            ).max(axis=1)
            # Body colours are random, so an occasional pixel may match the background closely.
            assert np.mean(difference > 3) >= 0.9
            checked += int(visible.sum())
            # A hidden joint is hidden by something: never by bare background.
            hidden = kp[:, 2] == 1
            cols, rows = np.rint(kp[hidden, :2]).astype(int).T
            assert np.all(render.id_map[rows, cols] != synth.BACKGROUND_ID)
    assert checked > 20


def test_sampled_poses_respect_joint_limits_and_proportions() -> None:
    rng = np.random.default_rng(0)
    for family in synth.POSE_FAMILIES:
        for _ in range(5):
            pose = synth.sample_pose(rng, family)
            for name, (low, high) in synth.JOINT_LIMITS_DEG.items():
                assert np.all(pose.angles[name] >= low) and np.all(pose.angles[name] <= high)
            person = synth.make_person(pose, (0.0, 0.0, -5.0), height=1.7)
            j = person.joints
            for a, b, c in ((synth.L_HIP, synth.L_KNEE, synth.L_ANKLE),
                            (synth.L_SHOULDER, synth.L_ELBOW, synth.L_WRIST)):  # fmt: skip
                upper, lower = j[b] - j[a], j[c] - j[b]
                cosine = np.dot(upper, lower) / (np.linalg.norm(upper) * np.linalg.norm(lower))
                assert np.degrees(np.arccos(np.clip(cosine, -1, 1))) <= 155.5
            thigh = np.linalg.norm(j[synth.L_KNEE] - j[synth.L_HIP]) / 1.7
            forearm = np.linalg.norm(j[synth.R_WRIST] - j[synth.R_ELBOW]) / 1.7
            assert 0.22 < thigh < 0.27 and 0.13 < forearm < 0.16


def test_knees_bend_backwards_and_elbows_forwards() -> None:
    pose = synth.Pose.neutral()
    pose.angles["knee"] = np.array([90.0, 0.0])
    pose.angles["elbow"] = np.array([90.0, 0.0])
    person = synth.make_person(pose, (0.0, 0.0, 0.0))  # yaw 0: forward is +z
    j = person.joints
    assert j[synth.L_ANKLE, 2] < j[synth.L_KNEE, 2] - 0.3  # shin points backwards
    assert j[synth.L_WRIST, 2] > j[synth.L_ELBOW, 2] + 0.2  # forearm points forwards
    assert abs(j[synth.R_ANKLE, 2] - j[synth.R_KNEE, 2]) < 0.05


def test_cli_subcommand_writes_a_dataset(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synth.add_synth_parser(parser.add_subparsers())
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--images", "2", "--seed", "1",
                              "--size", "64x80", "--workers", "1"])  # fmt: skip
    assert args.func(args) == 0
    data = json.loads((tmp_path / "annotations" / "person_keypoints_train.json").read_text())
    assert [(i["height"], i["width"]) for i in data["images"]] == [(64, 80), (64, 80)]
    for info in data["images"]:
        assert cv2.imread(str(tmp_path / "images" / "train" / info["file_name"])).shape[:2] == (
            64,
            80,
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", str(tmp_path), "--size", "big"])


def test_scene_options_narrow_what_is_drawn(tmp_path: Path) -> None:
    """One standing, camera-facing person of a bounded size per image, as the info records."""
    parser = argparse.ArgumentParser()
    synth.add_synth_parser(parser.add_subparsers())
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--images", "6", "--seed", "2",
                              "--size", "256x256", "--workers", "1", "--max-people", "1",
                              "--pose-families", "stand", "--height-range", "0.4:0.5",
                              "--views", "front"])  # fmt: skip
    assert args.func(args) == 0
    data = json.loads((tmp_path / "annotations" / "person_keypoints_train.json").read_text())
    assert data["info"]["scene"] == {
        "max_people": 1, "pose_families": ["stand"], "height_range": [0.4, 0.5], "views": ["front"],
    }  # fmt: skip
    per_image = [sum(a["image_id"] == i["id"] for a in data["annotations"]) for i in data["images"]]
    assert max(per_image) == 1 and sum(per_image) >= 4  # a figure may leave the frame entirely
    whole = [a for a in data["annotations"]  # in the frame, nearly every joint labelled
             if a["bbox"][1] > 0 and sum(a["bbox"][1::2]) < 255 and a["num_keypoints"] >= 15]
    assert whole
    for annotation in whole:  # standing, so the box is about the body's height
        assert 0.3 * 256 < annotation["bbox"][3] < 0.6 * 256, annotation["bbox"]
        assert _keypoints(annotation)[synth.NOSE, 2] == 2  # facing the camera


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--pose-families", "stand,fly", "unknown pose family fly"),
     ("--height-range", "0.5", "expected LOW:HIGH"),
     ("--height-range", "0.9:0.2", "0 < LOW <= HIGH"),
     ("--views", "front,top", "unknown view top")],
)  # fmt: skip
def test_scene_option_errors_name_the_problem(flag: str, value: str, message: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    synth.add_synth_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", "x", flag, value])
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="pose families"):
        synth.SceneOptions(pose_families=("fly",))
