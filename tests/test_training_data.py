"""Data side of training: recipes/overrides, records, augmentation geometry, image sources,
losses and the metric helpers. All on tiny hand-made or synthetic inputs (seconds)."""

from __future__ import annotations

import dataclasses
import gc
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from omnipose.model.codec import decode_heatmaps, encode_gaussian_heatmaps
from omnipose.model.skeleton import COCO_KEYPOINTS
from omnipose.model.topdown import PersonPose
from omnipose.model.transforms import (
    get_affine_transforms,
    normalize_crops,
    transform_points,
    warp_crops,
)
from omnipose.training.config import (
    ConfigError,
    ExperimentConfig,
    get_recipe,
    load_config,
    per_process_batch_size,
)
from omnipose.training.data import KeypointTrainDataset, half_body_box, load_split, target_weights
from omnipose.training.evaluate import coco_keypoint_eval, coco_results, pckh
from omnipose.training.image_sources import open_image_source
from omnipose.training.losses import JointsMSELoss, JointsOHKMLoss
from omnipose.training.records import (
    DataError,
    center_scale_to_box,
    clean_coco_box,
    load_detection_records,
    load_mpii_records,
)

NUM_JOINTS = 17


# --- a tiny hand-made COCO-format set -----------------------------------------------------------


def _person_keypoints(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list:
    """17 labelled joints spread inside the box (v=2), one unlabelled (v=0)."""
    xs = x + rng.uniform(0.1, 0.9, NUM_JOINTS) * w
    ys = y + np.linspace(0.05, 0.95, NUM_JOINTS) * h
    keypoints = np.stack([xs, ys, np.full(NUM_JOINTS, 2.0)], axis=1)
    keypoints[4] = 0  # right ear not labelled
    return keypoints.reshape(-1).round(2).tolist()


def make_coco_set(root: Path, split: str = "val", num_images: int = 4, seed: int = 0) -> Path:
    """Images with coloured rectangles as persons, plus annotations (some to be filtered)."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = 100 + index
        canvas = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(image_dir / name), canvas)
        images.append({"id": image_id, "file_name": name, "width": 160, "height": 120})
        for person in range(2):
            x, y, w, h = 10.0 + 70 * person, 10.0, 50.0, 90.0
            annotations.append(
                {
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "num_keypoints": 16,
                    "keypoints": _person_keypoints(rng, x, y, w, h),
                }
            )  # fmt: skip
        # filtered out: a crowd region and a person without keypoints
        annotations.append(
            {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
             "bbox": [0, 0, 20, 20], "area": 400.0, "num_keypoints": 0,
             "keypoints": [0] * 51}
        )  # fmt: skip
        annotations.append(
            {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
             "bbox": [100, 60, 20, 30], "area": 600.0, "num_keypoints": 0,
             "keypoints": [0] * 51}
        )  # fmt: skip
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINTS.joint_names),
                        "skeleton": [[a + 1, b + 1] for a, b in COCO_KEYPOINTS.limbs]}],
    }  # fmt: skip
    annotation_file = root / "annotations" / f"person_keypoints_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return annotation_file


def tiny_config(root: Path, **overrides: str) -> ExperimentConfig:
    values = [f"data.root={root}", "data.val_split=val", "data.train_split=val",
              "data.num_workers=0"]  # fmt: skip
    values += [f"{key}={value}" for key, value in overrides.items()]
    return load_config("synth-w8-96x64", values)


# --- config --------------------------------------------------------------------------------------


# The reference facts' table of released configs: lr, lr steps, sigma, batch (whole batch of a
# step), and the augmentation that differs between COCO and MPII.
PUBLISHED_TABLE = {
    "coco-w48-384x288": (1e-4, (140, 180), 3.0, 12),
    "coco-w48-256x192": (1e-3, (170, 200), 3.0, 32),
    "coco-w48-128x96": (1e-3, (170, 200), 1.0, 64),
    "mpii-w48-256x256": (1e-4, (170, 200), 2.0, 16),
}
COCO_AUGMENTATION = (0.35, 45.0, 0.6, True, 0.3, 8)  # scale, rotation, its prob, flip, half-body
MPII_AUGMENTATION = (0.25, 30.0, 0.6, True, 0.0, 8)  # no half-body


@pytest.mark.parametrize("name", sorted(PUBLISHED_TABLE))
def test_published_recipe_matches_the_reference_table(name: str) -> None:
    recipe = get_recipe(name)
    lr, steps, sigma, batch = PUBLISHED_TABLE[name]
    train, data = recipe.train, recipe.data
    assert (train.lr, train.lr_steps, data.sigma, train.batch_size) == (lr, steps, sigma, batch)
    # shared: Adam without weight decay (the published 1e-4 never reaches its Adam), 210 epochs
    assert (train.weight_decay, train.epochs, train.lr_factor) == (0.0, 210, 0.1)
    assert train.scale_lr_with_world_size is False
    augmentation = (data.scale_factor, data.rotation_factor, data.rotation_prob, data.flip,
                    data.half_body_prob, data.half_body_min_joints)  # fmt: skip
    expected = MPII_AUGMENTATION if name.startswith("mpii") else COCO_AUGMENTATION
    assert augmentation == expected
    assert (recipe.test.flip_test, recipe.test.oks_nms_threshold) == (True, 0.9)
    # the lighter widths train with the recipe of their input size
    for width in (32, 18):
        light = get_recipe(name.replace("w48", f"w{width}"))
        assert dataclasses.asdict(light.train) == dataclasses.asdict(train)
        assert dataclasses.asdict(light.data) == dataclasses.asdict(data)


def test_registry_and_synthetic_recipes() -> None:
    mpii = get_recipe("mpii-w48-256x256")
    assert (mpii.data.format, mpii.data.root, mpii.data.val_split) == ("mpii", "data/mpii", "valid")
    synth = get_recipe("synth-w18-128x96")
    assert synth.model.config == "coco-w18-128x96" and synth.data.train_split == "train"
    get_recipe("coco-w48-384x288").train.epochs = 1  # copies: the registry is not mutated
    assert get_recipe("coco-w48-384x288").train.epochs == 210


def test_ddp_splits_the_published_batch_or_scales_the_lr_when_asked() -> None:
    recipe = get_recipe("coco-w48-256x192")  # batch 32, lr 1e-3
    assert per_process_batch_size(recipe, 1) == (32, 1e-3)
    assert per_process_batch_size(recipe, 8) == (4, 1e-3)  # same recipe on 8 GPUs
    with pytest.raises(ConfigError, match=r"batch_size=32 .* 3 processes"):
        per_process_batch_size(recipe, 3)
    recipe.train.scale_lr_with_world_size = True  # the documented, opt-in alternative
    assert per_process_batch_size(recipe, 3) == (32, pytest.approx(3e-3))


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    config = load_config(
        "synth-w18-128x96",
        ["train.epochs=3", "data.root=/x", "train.lr_steps=1,2", "train.amp=false",
         "data.val_boxes=none", "train.lr=3e-4"],
    )  # fmt: skip
    assert config.train.epochs == 3 and config.data.root == "/x"
    assert config.train.lr_steps == (1, 2) and config.train.amp is False
    assert config.data.val_boxes is None and config.train.lr == pytest.approx(3e-4)
    for bad in (["train.epoch=3"], ["train.epochs=three"], ["nosection.x=1"], ["train.epochs"],
                ["model.config=coco-w18-100x96"], ["data.format=mpii"]):  # fmt: skip
        with pytest.raises(ConfigError):
            load_config("synth-w18-128x96", bad)
    with pytest.raises(ConfigError, match="unknown training config"):
        load_config("no-such-recipe")
    recipe_file = tmp_path / "mine.json"
    recipe_file.write_text(json.dumps({"base": "synth-w8-96x64", "train": {"epochs": 7}}))
    from_file = load_config(str(recipe_file), ["train.batch_size=5"])
    assert (from_file.name, from_file.train.epochs, from_file.train.batch_size) == ("mine", 7, 5)
    assert from_file.model.config == "coco-w8-96x64"
    assert ExperimentConfig.from_dict(from_file.to_dict()) == from_file


# --- records -----------------------------------------------------------------------------------


def test_coco_records_filter_crowds_and_empty_persons(tmp_path: Path) -> None:
    make_coco_set(tmp_path, "val", num_images=3)
    config = tiny_config(tmp_path)
    records, _, annotation_file = load_split(config.data, config.model_config(), "val")
    assert len(records) == 6 and records.num_images == 3  # 2 real persons per image
    assert records.visible.shape == (6, NUM_JOINTS) and (records.visible[:, 4] == 0).all()
    data = json.loads(annotation_file.read_text())
    first = next(a for a in data["annotations"] if a["image_id"] == 100)
    np.testing.assert_allclose(
        records.joints[0], np.asarray(first["keypoints"]).reshape(-1, 3)[:, :2], atol=1e-4
    )
    # box [10, 10, 50, 90] cleaned as published stays 50 x 90 px (inclusive corners 10..59,
    # 10..99); center x + (w - 1) / 2, scale at the model's aspect ratio (64/96), padded by 1.25
    np.testing.assert_allclose(records.boxes[0], [10, 10, 50, 90])
    np.testing.assert_allclose(records.centers[0], [10 + 49 / 2, 10 + 89 / 2])
    np.testing.assert_allclose(records.scales[0], np.array([90 * 64 / 96, 90]) / 200 * 1.25)
    with pytest.raises(DataError, match=r"person_keypoints_nosplit\.json"):
        load_split(config.data, config.model_config(), "nosplit")


def test_coco_box_cleaning_as_published() -> None:
    # x2 = x1 + max(0, w - 1) clipped to the image, then used as (x1, y1, x2 - x1 + 1, ...)
    assert clean_coco_box([10.0, 20.0, 30.0, 40.0], 1200.0, 640, 480) == [10, 20, 30, 40]
    assert clean_coco_box([-5.0, 470.0, 30.0, 40.0], 1.0, 640, 480) == [0, 470, 30, 10]
    assert clean_coco_box([600.5, 0.0, 100.0, 5.0], 1.0, 640, 480) == [600.5, 0, 39.5, 5]
    assert clean_coco_box([10.0, 20.0, 0.0, 0.5], 1.0, 640, 480) == [10, 20, 1, 1]  # a point
    assert clean_coco_box([10.0, 20.0, 30.0, 40.0], 0.0, 640, 480) is None  # zero area
    assert clean_coco_box([640.0, 20.0, 30.0, 40.0], 1.0, 640, 480) is None  # right of image


def test_detection_records_keep_person_boxes_above_threshold(tmp_path: Path) -> None:
    annotation_file = make_coco_set(tmp_path, "val", num_images=2)
    detections = [
        {"image_id": 100, "category_id": 1, "bbox": [5, 5, 40, 80], "score": 0.9},
        {"image_id": 100, "category_id": 1, "bbox": [5, 5, 40, 80], "score": 0.05},
        {"image_id": 101, "category_id": 3, "bbox": [5, 5, 40, 80], "score": 0.99},  # a car
        {"image_id": 101, "category_id": 1, "bbox": [50, 5, 30, 60], "score": 0.5},
    ]
    detections_file = tmp_path / "dets.json"
    detections_file.write_text(json.dumps(detections))
    config = tiny_config(tmp_path)
    records = load_detection_records(annotation_file, detections_file, config.model_config(), 0.1)
    np.testing.assert_allclose(records.scores, [0.9, 0.5])
    assert records.image_ids[records.image_index].tolist() == [100, 101]
    detections_file.write_text(json.dumps([{**detections[0], "image_id": 7}]))
    with pytest.raises(DataError, match="image_id 7"):
        load_detection_records(annotation_file, detections_file, config.model_config(), 0.0)


def test_mpii_records_use_hrnet_conversion(tmp_path: Path) -> None:
    joints = [[float(10 + j), float(20 + 2 * j)] for j in range(16)]
    entry = {"image": "a.jpg", "center": [50.0, 60.0], "scale": 0.5, "joints": joints,
             "joints_vis": [1] * 15 + [0]}  # fmt: skip
    annotation_file = tmp_path / "annot" / "valid.json"
    annotation_file.parent.mkdir(parents=True)
    annotation_file.write_text(json.dumps([entry, {**entry, "image": "b.jpg"}]))
    model_config = load_config("mpii-w18-256x256").model_config()
    records = load_mpii_records(annotation_file, model_config)
    np.testing.assert_allclose(records.joints[0], np.asarray(joints) - 1)  # 1-based -> 0-based
    np.testing.assert_allclose(records.centers[0], [50.0, 60.0 + 15 * 0.5])
    np.testing.assert_allclose(records.scales[0], [0.625, 0.625])
    assert records.visible[0, 15] == 0 and records.file_names == ["a.jpg", "b.jpg"]
    # head size without head boxes: upper neck (8) to head top (9), marked as not comparable
    assert records.head_sizes[0] == pytest.approx(np.hypot(1.0, 2.0))
    assert records.head_size_source.startswith("neck to head-top")
    # the equivalent box reproduces center and scale through the service's crop code
    from omnipose.model.transforms import box_to_center_scale

    centers, scales = box_to_center_scale(records.boxes, model_config.aspect_ratio)
    np.testing.assert_allclose(centers, records.centers)
    np.testing.assert_allclose(scales, records.scales)
    np.testing.assert_allclose(center_scale_to_box(centers, scales), records.boxes)


# --- training samples ----------------------------------------------------------------------------


def test_unaugmented_targets_peak_at_the_joints(tmp_path: Path) -> None:
    make_coco_set(tmp_path, "val", num_images=1)
    config = tiny_config(tmp_path)
    model_config = config.model_config()
    records, images, _ = load_split(config.data, model_config, "val")
    dataset = KeypointTrainDataset(records, images, model_config, config.data, augment=False)
    inputs, heatmaps, weights, index = dataset[0]
    assert inputs.shape == (3, 96, 64) and heatmaps.shape == (NUM_JOINTS, 24, 16)
    assert index == 0 and weights[4] == 0 and weights.sum() == 16
    coords, _ = decode_heatmaps(heatmaps[None])
    affine = get_affine_transforms(records.centers[:1], records.scales[:1], np.zeros(1), (16, 24))
    expected = transform_points(records.joints[:1], affine)[0]
    labelled = weights.numpy() > 0
    # DARK recovers sub-pixel peaks; near the map border the cut Gaussian biases it slightly
    np.testing.assert_allclose(coords[0][labelled], expected[labelled], atol=0.25)
    assert np.median(np.abs(coords[0][labelled] - expected[labelled])) < 0.02


def test_flip_mirrors_crop_and_swaps_joints(tmp_path: Path) -> None:
    make_coco_set(tmp_path, "val", num_images=1)
    config = tiny_config(
        tmp_path, **{"data.scale_factor": "0", "data.rotation_prob": "0",
                     "data.half_body_prob": "0"}
    )  # fmt: skip
    model_config = config.model_config()
    records, images, _ = load_split(config.data, model_config, "val")
    plain = KeypointTrainDataset(records, images, model_config, config.data, augment=False)
    augmented = KeypointTrainDataset(records, images, model_config, config.data, augment=True)
    image = images.read_rgb(records.file_names[0])
    flip_index = COCO_KEYPOINTS.flip_index()
    flipped_seen = plain_seen = False
    for epoch in range(12):
        augmented.set_epoch(epoch)
        rng = np.random.default_rng([augmented.seed, epoch, 0])
        affine, joints, visible, flip = augmented.sample_geometry(0, image.shape[1], rng)
        plain_affine, plain_joints, plain_visible, _ = plain.sample_geometry(
            0, image.shape[1], np.random.default_rng(0)
        )
        if not flip:
            np.testing.assert_allclose(affine, plain_affine)
            plain_seen = True
            continue
        flipped_seen = True
        # the flipped sample is what the published pipeline cuts: the mirrored image, center
        # x -> W - 1 - c_x, the transform built from it
        mirrored_center = [image.shape[1] - 1 - records.centers[0, 0], records.centers[0, 1]]
        expected = get_affine_transforms(
            np.array([mirrored_center]), records.scales[:1], np.zeros(1), (64, 96)
        )[0]
        np.testing.assert_allclose(affine, expected, atol=1e-12)
        sample_input = augmented[0][0]
        published_crop = warp_crops(image[:, ::-1].copy(), expected[None], (64, 96))
        torch.testing.assert_close(sample_input, normalize_crops(published_crop)[0])
        image_for_crop = image[:, ::-1].copy()
        heatmap_width = model_config.heatmap_size[1]
        # the flipped sample's joint j is the plain one's mirror joint, mirrored exactly about
        # the heatmap's centre pixel (x -> w - 1 - x): the pixel-centre convention needs no shift
        np.testing.assert_allclose(joints[:, 0], heatmap_width - 1 - plain_joints[flip_index, 0])
        np.testing.assert_allclose(joints[:, 1], plain_joints[flip_index, 1])
        np.testing.assert_array_equal(visible, plain_visible[flip_index])
        crop = cv2.warpAffine(image_for_crop, affine, (64, 96), flags=cv2.INTER_LINEAR)
        plain_crop = cv2.warpAffine(image, plain_affine, (64, 96), flags=cv2.INTER_LINEAR)
        # the crop is the plain crop mirrored, with no one-pixel offset. OpenCV samples on a
        # 1/32 px grid and may round a mirrored position the other way, which this white-noise
        # image turns into a few large differences; a one-pixel offset would mismatch ~97%.
        difference = np.abs(crop.astype(int) - plain_crop[:, ::-1].astype(int))
        assert (difference <= 1).mean() > 0.98, (difference <= 1).mean()
    assert flipped_seen and plain_seen


def test_augmentation_is_reproducible_per_epoch_and_varies_between_epochs(tmp_path: Path) -> None:
    make_coco_set(tmp_path, "val", num_images=1)
    config = tiny_config(tmp_path)
    model_config = config.model_config()
    records, images, _ = load_split(config.data, model_config, "val")
    dataset = KeypointTrainDataset(records, images, model_config, config.data, seed=5)
    dataset.set_epoch(3)
    first = dataset[1][0]
    again = dataset[1][0]
    dataset.set_epoch(4)
    other = dataset[1][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_zip_archive_reads_the_same_images(tmp_path: Path) -> None:
    make_coco_set(tmp_path / "folder", "val", num_images=2)
    zipped_root = tmp_path / "zipped"
    (zipped_root / "annotations").mkdir(parents=True)
    annotation = tmp_path / "folder" / "annotations" / "person_keypoints_val.json"
    (zipped_root / "annotations" / annotation.name).write_bytes(annotation.read_bytes())
    (zipped_root / "images").mkdir()
    with zipfile.ZipFile(zipped_root / "images" / "val.zip", "w") as archive:
        for image in sorted((tmp_path / "folder" / "images" / "val").iterdir()):
            archive.write(image, f"val/{image.name}")  # official archives nest a folder
    folder_config = tiny_config(tmp_path / "folder")
    zip_config = tiny_config(zipped_root)
    model_config = folder_config.model_config()
    folder_records, folder_images, _ = load_split(folder_config.data, model_config, "val")
    zip_records, zip_images, _ = load_split(zip_config.data, model_config, "val")
    assert type(zip_images).__name__ == "ZipImages"
    folder_set = KeypointTrainDataset(folder_records, folder_images, model_config,
                                      folder_config.data)  # fmt: skip
    zip_set = KeypointTrainDataset(zip_records, zip_images, model_config, zip_config.data)
    assert torch.equal(folder_set[3][0], zip_set[3][0])
    # the archive is opened lazily inside each worker process
    loader = DataLoader(zip_set, batch_size=2, num_workers=2)
    batch_inputs = next(iter(loader))[0]
    assert torch.equal(batch_inputs[1], folder_set[1][0])
    with pytest.raises(DataError, match=r"val\.zip:missing\.jpg"):
        zip_images.read_rgb("missing.jpg")


def _jpeg_with_exif_orientation_6(path: Path) -> np.ndarray:
    """A 40x20 (w x h) JPEG tagged "rotate 90 deg clockwise to display"; returns stored RGB."""
    from PIL import Image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue in stored pixel order
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return stored


def test_images_are_read_in_stored_pixel_order_ignoring_exif(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    stored = _jpeg_with_exif_orientation_6(folder / "phone.jpg")
    upright = cv2.imread(str(folder / "phone.jpg"), cv2.IMREAD_COLOR)
    assert upright.shape == (40, 20, 3)  # OpenCV's default applies the tag: the test can fail
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.write(folder / "phone.jpg", "archive/phone.jpg")
    for source in (open_image_source(folder), open_image_source(tmp_path / "archive")):
        image = source.read_rgb("phone.jpg")
        assert image.shape == (20, 40, 3)  # as stored, as COCO labels refer to
        left, right = image[:, :16].mean(axis=(0, 1)), image[:, 24:].mean(axis=(0, 1))
        np.testing.assert_allclose(left, stored[0, 0], atol=8)  # red left (JPEG noise only)
        np.testing.assert_allclose(right, stored[0, -1], atol=8)


def test_half_body_picks_the_upper_body_from_a_normal_sample() -> None:
    joints = np.zeros((17, 2))
    joints[:11] = np.c_[np.linspace(10, 20, 11), np.linspace(0, 29, 11)]  # upper: x 10..20
    joints[11:] = np.c_[np.linspace(40, 50, 6), np.linspace(60, 99, 6)]  # lower
    visible = np.ones(17)
    rng = np.random.default_rng(0)
    upper = 0
    for _ in range(4000):
        center, scale = half_body_box(joints, visible, tuple(range(11)), 0.75, rng)
        upper += int(center[0] < 30)
    # P(N(0, 1) < 0.5) = 0.691 as published, not the 0.5 a uniform sample would give
    assert abs(upper / 4000 - 0.691) < 0.025
    center, scale = half_body_box(joints, visible, tuple(range(11)), 0.75,
                                  np.random.default_rng(0))  # fmt: skip
    first_normal = np.random.default_rng(0).standard_normal()
    assert (center[0] < 30) == (first_normal < 0.5)
    # extent max - min + 1: upper 11 x 30 px -> widened to 22.5 x 30, x1.5 padding, /200
    upper_center, upper_scale = center, scale
    if center[0] > 30:
        rng = np.random.default_rng(1)
        while True:
            upper_center, upper_scale = half_body_box(joints, visible, tuple(range(11)), 0.75, rng)
            if upper_center[0] < 30:
                break
    np.testing.assert_allclose(upper_center, joints[:11].mean(axis=0))
    np.testing.assert_allclose(upper_scale, np.array([30 * 0.75, 30]) / 200 * 1.5)


def test_target_weight_is_zero_when_the_truncated_3_sigma_window_misses_the_map() -> None:
    heatmap_size = (24, 16)  # h, w; sigma 2 -> window radius 6
    joints = np.array([[-7.5, 10.0], [-8.0, 10.0], [21.9, 10.0], [22.0, 10.0], [8.0, -7.9],
                       [8.0, 29.9], [8.0, 30.0], [8.0, 12.0]])  # fmt: skip
    visible = np.array([1, 1, 1, 1, 1, 1, 1, 0])
    weights = target_weights(joints, visible, heatmap_size, 2.0)
    # int(-7.5 + 7) = 0 is not < 0 (kept, its map empty as published); int(-8 + 7) = -1 is
    assert weights.tolist() == [1, 0, 1, 0, 1, 1, 0, 0]
    heatmaps, _ = encode_gaussian_heatmaps(joints[None], visible[None], heatmap_size, 2.0)
    assert heatmaps[0, 0].max() == 0 and heatmaps[0, 2].max() > 0  # kept, empty: as published


def test_missing_or_corrupt_image_names_the_file(tmp_path: Path) -> None:
    make_coco_set(tmp_path, "val", num_images=2)
    config = tiny_config(tmp_path)
    model_config = config.model_config()
    records, images, _ = load_split(config.data, model_config, "val")
    missing = tmp_path / "images" / "val" / records.file_names[1]
    missing.unlink()
    corrupt = tmp_path / "images" / "val" / records.file_names[0]
    corrupt.write_bytes(b"not a jpeg")
    dataset = KeypointTrainDataset(records, images, model_config, config.data)
    with pytest.raises(DataError, match=r"cannot decode image .*000000000100\.jpg"):
        dataset[0]
    from omnipose.training.cli import _one_line

    # through a worker process: the error comes back wrapped in the worker's traceback text
    batches = iter(DataLoader(torch.utils.data.Subset(dataset, [2]), num_workers=1))
    try:
        with pytest.raises(DataError, match=r"cannot read image .*0000001") as raised:
            next(batches)
    finally:
        del batches  # shut the worker down now, not at a later garbage collection
        gc.collect()
    message = _one_line(raised.value)
    assert message.startswith("cannot read image") and str(missing) in message
    assert "\n" not in message
    with pytest.raises(DataError, match="not found"):
        open_image_source(tmp_path / "images" / "nosplit")


# --- losses and metrics ---------------------------------------------------------------------


def test_losses_ignore_zero_weight_joints_and_ohkm_takes_the_hardest() -> None:
    target = torch.zeros(2, 4, 3, 3)
    prediction = torch.zeros(2, 4, 3, 3)
    prediction[:, 0] = 1.0  # joint 0 entirely wrong
    prediction[:, 1] = 0.5
    weights = torch.ones(2, 4)
    full = JointsMSELoss()(prediction, target, weights)
    assert full.item() == pytest.approx(0.5 * (1.0 + 0.25) / 4)
    weights[:, 0] = 0
    assert JointsMSELoss()(prediction, target, weights).item() == pytest.approx(0.5 * 0.25 / 4)
    hardest = JointsOHKMLoss(top_k=1)(prediction, target, torch.ones(2, 4))
    assert hardest.item() == pytest.approx(0.5)


def test_pckh_counts_joints_within_half_a_head() -> None:
    ground_truth = np.zeros((2, 16, 2))
    predictions = np.zeros((2, 16, 2))
    predictions[0, 0] = [0.0, 4.0]  # head size 10: 0.4 -> hit
    predictions[1, 0] = [0.0, 6.0]  # 0.6 -> miss
    predictions[:, 6] = [100.0, 0]  # pelvis wrong, but excluded from the mean
    visible = np.ones((2, 16))
    visible[1, 1] = 0
    per_joint, mean = pckh(predictions, ground_truth, visible, np.array([10.0, 10.0]))
    assert per_joint[0] == 0.5 and per_joint[1] == 1.0 and per_joint[6] == 0.0
    counted = visible.sum(axis=0)
    counted[[6, 7]] = 0
    assert mean == pytest.approx((counted.sum() - 1) / counted.sum())


def test_ground_truth_as_predictions_scores_ap_one(tmp_path: Path) -> None:
    annotation_file = make_coco_set(tmp_path, "val", num_images=4)
    config = tiny_config(tmp_path)
    records, _, _ = load_split(config.data, config.model_config(), "val")
    outputs = []
    for group in records.persons_by_image():
        poses = [
            PersonPose(
                records.boxes[row],
                1.0,
                np.concatenate([records.joints[row], records.visible[row][:, None]], 1),
                1.0,
            )
            for row in group
        ]
        outputs.append((int(records.image_index[group[0]]), poses))
    perfect = coco_keypoint_eval(annotation_file, coco_results(outputs, records))
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AR"] == pytest.approx(1.0)
    for _, poses in outputs:  # move every prediction 8 px: must hurt
        for pose in poses:
            pose.keypoints[:, 0] += 8.0
    shifted = coco_keypoint_eval(annotation_file, coco_results(outputs, records))
    assert shifted["AP"] < 0.9
    assert coco_keypoint_eval(annotation_file, [])["AP"] == 0.0


def test_mpii_evaluation_scores_ground_truth_perfectly(tmp_path: Path) -> None:
    from omnipose.training.evaluate import _mpii_from_outputs, evaluate_model

    rng = np.random.default_rng(0)
    entries = []
    for image, people in (("a.jpg", 2), ("b.jpg", 1)):
        cv2.imwrite(str(tmp_path / image), rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
        for _ in range(people):
            joints = rng.uniform(20, 60, (16, 2)).round(1).tolist()
            entries.append({"image": image, "center": [50.0, 40.0], "scale": 0.3,
                            "joints": joints, "joints_vis": [1] * 16})  # fmt: skip
    (tmp_path / "annot").mkdir()
    (tmp_path / "annot" / "valid.json").write_text(json.dumps(entries))
    (tmp_path / "images").mkdir()
    for image in ("a.jpg", "b.jpg"):
        (tmp_path / image).rename(tmp_path / "images" / image)
    config = load_config(
        "mpii-w18-256x256",
        [f"data.root={tmp_path}", "data.num_workers=0", "model.config=mpii-w8-256x256"],
    )
    records, _, _ = load_split(config.data, config.model_config(), "valid")
    outputs = [
        (int(records.image_index[group[0]]),
         [PersonPose(records.boxes[r], 1.0, np.c_[records.joints[r], np.ones(16)], 1.0)
          for r in group])
        for group in records.persons_by_image()
    ]  # fmt: skip
    spec = config.model_config().keypoints
    assert _mpii_from_outputs(outputs, records, spec)["Mean"] == 1.0
    outputs[0][1][0].keypoints[:, 0] += 100  # first person of a.jpg far off
    wrong = _mpii_from_outputs(outputs, records, spec)
    assert wrong["Mean"] == pytest.approx(2 / 3) and wrong["Head"] == pytest.approx(2 / 3)
    # the whole path with an (untrained) network runs and reports every metric
    from omnipose.model.network import build_model

    network = build_model(config.model_config())
    result = evaluate_model(network, config, device=torch.device("cpu"), progress=False)
    assert result.kind == "mpii" and result.num_persons == 3
    assert {"Head", "Mean", "Mean@0.1", "head_top"} <= set(result.metrics)
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    # no head boxes: the neck to head-top fallback is labelled as not comparable
    assert result.metrics["comparable"] == 0.0 and "NOT COMPARABLE" in result.table()
    # the official gt_valid.mat beside the annotations is picked up by itself
    head_boxes = np.tile([[0.0, 0.0], [6.0, 8.0]], (3, 1, 1))
    mat = tmp_path / "annot" / "gt_valid.mat"
    _write_gt_valid_mat(mat, records.joints + 1.0, np.zeros((3, 16)), head_boxes)
    # (one pass per crop: the head boxes' source is what is checked, not flip test)
    result = evaluate_model(network, config, device=torch.device("cpu"), progress=False,
                            flip_test=False)  # fmt: skip
    assert result.metrics["comparable"] == 1.0 and "gt_valid.mat" in result.table()


def _write_gt_valid_mat(
    path: Path, joints_1based: np.ndarray, missing: np.ndarray, head_boxes: np.ndarray
) -> None:
    """The official gt_valid.mat structure: per-person data along the LAST axis."""
    import scipy.io

    names = np.array(list(MPII_JOINT_NAMES), dtype=object)
    scipy.io.savemat(
        path,
        {
            "dataset_joints": names[None],
            "jnt_missing": missing.T.astype(np.float64),  # [16, N]
            "pos_gt_src": np.asarray(joints_1based, np.float64).transpose(1, 2, 0),  # [16, 2, N]
            "pos_pred_src": np.zeros((16, 2, len(missing))),
            "headboxes_src": np.asarray(head_boxes, np.float64).transpose(1, 2, 0),  # [2, 2, N]
        },
    )


MPII_JOINT_NAMES = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor", "neck",
                    "head", "rwri", "relb", "rsho", "lsho", "lelb", "lwri")  # fmt: skip


def test_mpii_pckh_as_published_with_the_official_head_boxes(tmp_path: Path) -> None:
    from omnipose.training.evaluate import mpii_metrics

    rng = np.random.default_rng(3)
    num = 4
    gt = rng.uniform(50, 150, (num, 16, 2)).round(1)  # 0-based truth
    missing = np.zeros((num, 16))
    missing[1:, 13] = 1  # left shoulder labelled on person 0 only
    boxes = np.tile([[10.0, 20.0], [16.0, 28.0]], (num, 1, 1))  # diagonal 10 -> normaliser 6
    (tmp_path / "annot").mkdir()
    gt_file = tmp_path / "annot" / "gt_valid.mat"
    _write_gt_valid_mat(gt_file, gt + 1.0, missing, boxes)  # the .mat is 1-based
    entries = [
        {
            "image": f"{i}.jpg",
            "center": [100.0, 100.0],
            "scale": 1.0,
            "joints": np.zeros((16, 2)).tolist(),
            "joints_vis": [1] * 16,
        }
        for i in range(num)
    ]  # fmt: skip  (the JSON's joints differ: the .mat must win)
    annotation_file = tmp_path / "annot" / "valid.json"
    annotation_file.write_text(json.dumps(entries))
    model_config = load_config("mpii-w18-256x256").model_config()
    records = load_mpii_records(annotation_file, model_config, gt_file)
    np.testing.assert_allclose(records.joints, gt, atol=1e-4)
    np.testing.assert_allclose(records.head_sizes, 6.0)
    assert records.visible[1, 13] == 0 and records.visible[0, 13] == 1

    predictions = gt.copy()
    predictions[0, 9, 0] += 2.9  # head top 0.483 head sizes off: a hit at 0.5
    predictions[1, 9, 0] += 3.1  # 0.517: a miss (with the diagonal alone, 0.31, a hit)
    predictions[0, 13, 1] += 10.0  # the only labelled left shoulder: a miss
    predictions[2, 0, 0] += 0.105 * 6  # right ankle 0.105 off: a hit at 0.11, a miss at 0.1
    predictions[:, 6] += 50.0  # pelvis and thorax are not in the mean
    predictions[:, 7] += 50.0
    metrics = mpii_metrics(predictions, records, model_config.keypoints)
    assert metrics["Head"] == pytest.approx(3 / 4)  # head top only
    assert metrics["Shoulder"] == pytest.approx((1.0 + 0.0) / 2)  # unweighted pair (not 4/5)
    assert metrics["Ankle"] == 1.0 and metrics["pelvis"] == 0.0
    counted = records.visible.sum(axis=0)
    counted[[6, 7]] = 0
    total = counted.sum()
    assert metrics["Mean"] == pytest.approx((total - 2) / total)
    assert metrics["Mean@0.1"] == pytest.approx((total - 3) / total)  # read at 0.11
    assert metrics["comparable"] == 1.0
    # a .mat of other persons is refused, naming the problem
    _write_gt_valid_mat(gt_file, gt[:3] + 1.0, missing[:3], boxes[:3])
    with pytest.raises(DataError, match=r"headboxes_src|pos_gt_src"):
        load_mpii_records(annotation_file, model_config, gt_file)


def test_training_targets_decode_to_the_annotations_through_the_serving_path(
    tmp_path: Path,
) -> None:
    """Targets and inference agree on geometry: perfect heatmaps must score AP 1 through
    ``TopDownPoseEstimator`` (crop, DARK decode, inverse transform) and pycocotools."""
    from omnipose.model.network import build_model
    from omnipose.model.topdown import TopDownPoseEstimator

    annotation_file = make_coco_set(tmp_path, "val", num_images=3)
    config = tiny_config(tmp_path)
    model_config = config.model_config()
    records, images, _ = load_split(config.data, model_config, "val")
    dataset = KeypointTrainDataset(records, images, model_config, config.data, augment=False)
    estimator = TopDownPoseEstimator(build_model(model_config), model_config)
    outputs = []
    for group in records.persons_by_image():
        image = images.read_rgb(records.file_names[records.image_index[group[0]]])
        crops = estimator.prepare(image, records.boxes[group], records.scores[group])
        heatmaps = torch.stack([dataset[int(row)][1] for row in group])
        poses = estimator.decode(heatmaps, crops, nms_threshold=None)
        outputs.append((int(records.image_index[group[0]]), poses))
        for row, pose in zip(group, poses, strict=True):
            labelled = records.visible[row] > 0
            error = np.abs(pose.keypoints[labelled, :2] - records.joints[row][labelled])
            assert np.median(error) < 0.2  # image pixels
    metrics = coco_keypoint_eval(annotation_file, coco_results(outputs, records))
    assert metrics["AP"] > 0.99
