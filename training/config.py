"""Training recipes: typed experiment configs, a registry of named recipes and overrides.

A recipe is an :class:`ExperimentConfig` (model, data, augmentation, optimisation, testing).
``omnipose train CONFIG`` takes either a registered recipe name (``coco-w48-384x288``,
``mpii-w48-256x256``, ``synth-w18-128x96``, ...) or a JSON/YAML file holding a nested mapping,
optionally starting from a registered recipe with ``base: NAME``. Overrides are dotted
``section.field=value`` pairs (``train.epochs=3 data.root=/x``); values are parsed as the type of
the field they replace, so a typo or a wrong type is a one-line :class:`ConfigError`.

The published recipes (see the reference facts) set the defaults, one per input size (table in
:data:`PUBLISHED_RECIPES`): Adam, 210 epochs, lr x0.1 at two steps, random scale, rotation
(applied with probability 0.6, clipped to twice the factor), flips, and for COCO half-body crops
with probability 0.3. Their config also lists weight decay 1e-4, but the published training (like
HRNet's) passes that value only to SGD and builds Adam with the learning rate alone; the default
here is therefore 0, which is what the published runs trained with. Coupled L2 decay on Adam is no
harmless extra: heatmap-MSE gradients are small enough that 1e-4 x weight competes with them and
slows learning several-fold.

``train.batch_size`` is the published batch: the WHOLE batch of one optimiser step (the released
script trains in one process). Under DDP each process takes ``batch_size / world_size`` of it
(:func:`per_process_batch_size`), so ``torchrun`` on 8 GPUs trains the same recipe;
``train.scale_lr_with_world_size=true`` instead keeps ``batch_size`` per process and multiplies
the lr by the world size (the linear scaling rule), which is a different recipe and off by default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnipose.model.configs import CONFIGS, ModelConfig, get_config


class ConfigError(ValueError):
    """A recipe name, file or override is unusable; the message is one line."""


@dataclass
class ModelSection:
    """Which network to train and how to initialise it."""

    config: str = "coco-w48-384x288"  # a model.configs name: dataset, width, input size
    pretrained: str | None = None  # ImageNet HRNet-W48 backbone weights (file path), optional
    init_weights: str | None = None  # full OmniPose checkpoint to start from (fine-tuning)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP

    def model_config(self) -> ModelConfig:
        try:
            return get_config(self.config)
        except KeyError as error:
            raise ConfigError(str(error.args[0])) from None


@dataclass
class DataSection:
    """Where the data lives and how samples are built (augmentation included)."""

    format: str = "coco"  # "coco" (COCO and synthetic sets) or "mpii"
    root: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    num_workers: int = 4
    # augmentation (training only)
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6
    flip: bool = True
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8
    # targets
    sigma: float = 2.0
    # training persons smaller than this (annotation "area", px^2) are skipped; COCO labels
    # keypoints of small persons rarely, synthetic sets label even 1-px people
    min_person_area: float = 0.0
    # validation boxes: ground truth (None) or a COCO results-format person detections file
    val_boxes: str | None = None
    box_score_threshold: float = 0.0
    max_val_images: int | None = None  # evaluate on the first N images only (quick checks)
    # MPII: the official gt_valid.mat (PCKh head boxes); default ROOT/annot/gt_{val_split}.mat
    mpii_gt_file: str | None = None


@dataclass
class TrainSection:
    """Optimisation schedule and run bookkeeping."""

    epochs: int = 210
    batch_size: int = 12  # the whole batch of one step; split over DDP processes
    scale_lr_with_world_size: bool = False  # DDP: batch_size per process, lr x world size
    lr: float = 1e-4
    weight_decay: float = 0.0  # L2 on Adam; the published 1e-4 never reached its Adam (above)
    lr_steps: tuple[int, ...] = (140, 180)
    lr_factor: float = 0.1
    loss: str = "mse"  # "mse" or "ohkm" (online hard keypoint mining, top 8 joints)
    amp: bool = True  # mixed precision; only takes effect on CUDA
    seed: int = 42
    val_every: int = 1  # validate every N epochs (and after the last one)
    log_every: int = 50  # TensorBoard scalar logging period in steps
    max_steps_per_epoch: int | None = None  # cap an epoch (smoke runs, tests)
    progress: bool = True  # tqdm bars on rank 0
    tensorboard: bool = True  # TensorBoard events under OUTPUT_DIR/tensorboard (rank 0)
    deterministic: bool = False  # torch deterministic algorithms (slower; for tests)
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)


@dataclass
class TestSection:
    """Evaluation as published: flip test, OKS-NMS 0.9, rescoring with confidence > 0.2."""

    flip_test: bool = True
    flip_shift: bool = False
    batch_size: int = 64
    oks_nms_threshold: float = 0.9
    num_vis_images: int = 4  # validation images with drawn predictions sent to TensorBoard


@dataclass
class ExperimentConfig:
    """Everything one training run needs; ``to_dict`` is stored in its checkpoints."""

    name: str = "coco-w48-384x288"
    output_dir: str = "runs/coco-w48-384x288"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    test: TestSection = field(default_factory=TestSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        config = cls()
        apply_mapping(config, data)
        return config

    def model_config(self) -> ModelConfig:
        return self.model.model_config()

    def validate(self) -> ExperimentConfig:
        """Cross-field checks that a typed field alone cannot express."""
        model_config = self.model_config()
        if self.data.format not in ("coco", "mpii"):
            raise ConfigError(f"data.format must be 'coco' or 'mpii', got {self.data.format!r}")
        if model_config.dataset != self.data.format:
            raise ConfigError(
                f"model {model_config.name} predicts {model_config.dataset} joints but "
                f"data.format is {self.data.format!r}"
            )
        if self.train.loss not in ("mse", "ohkm"):
            raise ConfigError(f"train.loss must be 'mse' or 'ohkm', got {self.train.loss!r}")
        for name in ("epochs", "batch_size", "val_every", "log_every"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if self.test.batch_size < 1:
            raise ConfigError("test.batch_size must be at least 1")
        if self.data.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        return self


# --- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedRecipe:
    """What differs between the released configs (the reference facts' table)."""

    lr: float
    lr_steps: tuple[int, int]
    sigma: float
    batch_size: int  # the whole batch of one optimiser step
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    half_body_prob: float = 0.3


# Keyed by (dataset, input (height, width)); the lighter widths train with the W48 recipe of their
# input size (the published configs only differ by input size).
PUBLISHED_RECIPES: dict[tuple[str, tuple[int, int]], PublishedRecipe] = {
    ("coco", (384, 288)): PublishedRecipe(lr=1e-4, lr_steps=(140, 180), sigma=3.0, batch_size=12),
    ("coco", (256, 192)): PublishedRecipe(lr=1e-3, lr_steps=(170, 200), sigma=3.0, batch_size=32),
    ("coco", (128, 96)): PublishedRecipe(lr=1e-3, lr_steps=(170, 200), sigma=1.0, batch_size=64),
    ("mpii", (256, 256)): PublishedRecipe(
        lr=1e-4, lr_steps=(170, 200), sigma=2.0, batch_size=16,
        scale_factor=0.25, rotation_factor=30.0, half_body_prob=0.0,
    ),
}  # fmt: skip


def _published_recipe(model_config: ModelConfig) -> ExperimentConfig:
    """The released recipe of one model config's dataset and input size."""
    key = (model_config.dataset, tuple(model_config.input_size))
    if key not in PUBLISHED_RECIPES:
        raise ConfigError(f"no published recipe for {model_config.name}")
    recipe = PUBLISHED_RECIPES[key]
    augmentation = {
        "sigma": recipe.sigma,
        "scale_factor": recipe.scale_factor,
        "rotation_factor": recipe.rotation_factor,
        "half_body_prob": recipe.half_body_prob,
    }
    if model_config.dataset == "mpii":
        data = DataSection(
            format="mpii", root="data/mpii", train_split="train", val_split="valid", **augmentation
        )
    else:
        data = DataSection(**augmentation)
    return ExperimentConfig(
        name=model_config.name,
        output_dir=f"runs/{model_config.name}",
        model=ModelSection(config=model_config.name),
        data=data,
        train=TrainSection(
            batch_size=recipe.batch_size, lr=recipe.lr, lr_steps=tuple(recipe.lr_steps)
        ),
    )


def per_process_batch_size(config: ExperimentConfig, world_size: int) -> tuple[int, float]:
    """(batch per process, lr) for a run over ``world_size`` processes.

    By default the configured (published) batch is split evenly, so one optimiser step sees the
    same number of samples as the published single-process run and the lr stays as published.
    With ``train.scale_lr_with_world_size`` every process takes the full configured batch and the
    lr grows linearly with the world size (Goyal et al. 2017), a different recipe.
    """
    train = config.train
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    if train.scale_lr_with_world_size:
        return train.batch_size, train.lr * world_size
    if train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={train.batch_size} (the whole batch of one step) does not split "
            f"evenly over {world_size} processes; pick a multiple of {world_size}, or set "
            "train.scale_lr_with_world_size=true to use it per process with the lr scaled"
        )
    return train.batch_size // world_size, train.lr


def _synthetic_recipe(width: int, input_height: int, input_width: int) -> ExperimentConfig:
    """CPU-sized recipe on a synthetic COCO-format set (``omnipose.training.synth``; splits
    train/val).

    lr 1e-3 instead of the published 1e-4 (few epochs, from scratch, no pretrained backbone);
    persons under 32x32 px are not trained on (the generator labels even 1-px figures); the
    augmentation is the published one. One loader worker: on a two-core machine the second
    core computes.
    """
    model_name = f"coco-w{width}-{input_height}x{input_width}"
    name = f"synth-w{width}-{input_height}x{input_width}"
    return ExperimentConfig(
        name=name,
        output_dir=f"runs/{name}",
        model=ModelSection(config=model_name),
        data=DataSection(
            format="coco",
            root="data/synth",
            train_split="train",
            val_split="val",
            num_workers=1,
            min_person_area=1024.0,
        ),
        train=TrainSection(
            epochs=40, batch_size=32, lr=1e-3, lr_steps=(30, 36), amp=False, log_every=10
        ),
        test=TestSection(batch_size=64),
    )


def _build_registry() -> dict[str, ExperimentConfig]:
    recipes = {name: _published_recipe(config) for name, config in CONFIGS.items()}
    for width, height, input_width in ((18, 128, 96), (8, 96, 64)):
        recipe = _synthetic_recipe(width, height, input_width)
        recipes[recipe.name] = recipe
    return recipes


RECIPES: dict[str, ExperimentConfig] = _build_registry()


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> ExperimentConfig:
    """A fresh (mutable) copy of a registered recipe."""
    if name not in RECIPES:
        raise ConfigError(
            f"unknown training config {name!r}: not a recipe name or an existing .json/.yaml "
            f"file; recipes: {', '.join(recipe_names())}"
        )
    return dataclasses.replace(
        RECIPES[name],
        model=dataclasses.replace(RECIPES[name].model),
        data=dataclasses.replace(RECIPES[name].data),
        train=dataclasses.replace(RECIPES[name].train),
        test=dataclasses.replace(RECIPES[name].test),
    )


def _read_mapping_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML; use JSON instead") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Recipe name or config file, then ``key=value`` overrides, validated."""
    path = Path(name_or_path)
    if name_or_path in RECIPES:
        config = get_recipe(name_or_path)
    elif path.suffix.lower() in (".json", ".yaml", ".yml") and path.is_file():
        data = _read_mapping_file(path)
        base = data.pop("base", None)
        config = get_recipe(base) if base else ExperimentConfig()
        if "name" not in data:
            data["name"] = path.stem
        apply_mapping(config, data, source=str(path))
    else:
        config = get_recipe(name_or_path)  # raises with the list of recipes
    apply_overrides(config, overrides or [])
    return config.validate()


# --- overrides ----------------------------------------------------------------------------------


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a string (from the command line) or a JSON value to the field's type."""
    base, optional = _strip_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ConfigError(f"{key} cannot be empty")
        return None
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) is tuple:
            item_type = typing.get_args(base)[0]
            items = value
            if isinstance(value, str):
                text = value.strip().strip("[]()")
                items = [part for part in text.split(",") if part.strip()]
            return tuple(_coerce(item, item_type, key) for item in items)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value for {key}: {error}") from None
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _assign(target: Any, key: str, value: Any, dotted: str) -> None:
    """Set field ``key`` of a config section, recursing into sub-sections for mappings."""
    hints = _field_types(target)
    if key not in hints:
        known = ", ".join(hints)
        raise ConfigError(f"unknown config key {dotted!r} (fields here: {known})")
    current = getattr(target, key)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} is a section; set its fields ({dotted}.FIELD=VALUE)")
        for sub_key, sub_value in value.items():
            _assign(current, sub_key, sub_value, f"{dotted}.{sub_key}")
    else:
        setattr(target, key, _coerce(value, hints[key], dotted))


def set_value(config: ExperimentConfig, key: str, value: Any) -> None:
    """Set one dotted key (``train.epochs``) with type conversion."""
    *sections, leaf = key.split(".")
    target: Any = config
    for depth, part in enumerate(sections):
        child = getattr(target, part, None) if part in _field_types(target) else None
        if not dataclasses.is_dataclass(child):
            raise ConfigError(
                f"unknown config key {key!r} (no section {'.'.join(sections[: depth + 1])!r})"
            )
        target = child
    _assign(target, leaf, value, key)


def apply_mapping(target: Any, data: dict[str, Any], source: str = "") -> None:
    """Apply a nested mapping (from a file or a stored checkpoint) onto a config object."""
    try:
        for key, value in data.items():
            _assign(target, str(key), value, str(key))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> None:
    """Apply ``section.field=value`` strings in order."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form section.field=value")
        set_value(config, key.strip(), value.strip())
