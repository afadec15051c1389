"""The training loop: data, optimisation, validation, checkpoints, logs, exact resume.

One :class:`Trainer` per process. Under ``torchrun`` every rank trains its share of each epoch
(DistributedSampler) inside DistributedDataParallel; rank 0 alone writes checkpoints, TensorBoard
events and the log. Every epoch ends with ``last.pt`` (the full training state) and, when the
validation metric improves, ``model_best.pt`` (weights + metadata, servable as is). Both are
project checkpoints that ``omnipose.model.checkpoint.load_model`` reads; ``last.pt`` additionally
holds a ``training_state`` entry (optimizer, scheduler, grad scaler, epoch, step, best metric, RNG
states) made only of tensors and plain types, so ``torch.load(weights_only=True)`` still reads it.

Resuming restores all of that; together with per-sample augmentation seeds and per-epoch
shuffling seeds (see :mod:`omnipose.training.data`) the resumed run continues exactly as the
uninterrupted one would have.
"""

from __future__ import annotations

import collections
import datetime
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from omnipose.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_torch_save,
    load_model,
    save_checkpoint,
)
from omnipose.model.configs import ModelConfig
from omnipose.model.network import OmniPose, build_model
from omnipose.training.config import ExperimentConfig, per_process_batch_size
from omnipose.training.data import KeypointTrainDataset, fork_safe_opencv, load_split
from omnipose.training.distributed import (
    DistContext,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
)
from omnipose.training.evaluate import MEAN_OKS, EvalResult, evaluate_model
from omnipose.training.init import InitError, load_imagenet_backbone
from omnipose.training.losses import build_loss

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "model_best.pt"
LOG_FILE = "train.log"


class TrainingError(Exception):
    """A training run cannot start or continue; the message is one line."""


# --- checkpoint helpers ---------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU + CUDA) as tensors and plain numbers."""
    version, python_state, gauss = random.getstate()
    kind, numpy_keys, numpy_pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    state = dict(scheduler.state_dict())
    state["milestones"] = {int(k): int(v) for k, v in state["milestones"].items()}
    return state


def _load_scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR, state: dict) -> bool:
    """Restore the scheduler's position; the configured milestones stay in force.

    The milestones come from the resuming run's config, not the checkpoint, so a run can be
    resumed with a longer schedule (``train.epochs=40 train.lr_steps=[30,36]``). With an
    unchanged config this is the exact restore. Returns whether the milestones changed.
    """
    state = dict(state)
    stored = collections.Counter({int(k): int(v) for k, v in state["milestones"].items()})
    configured = collections.Counter(scheduler.milestones)
    state["milestones"] = configured
    scheduler.load_state_dict(state)
    return stored != configured


# --- the trainer ----------------------------------------------------------------------------------


@dataclass
class EpochSummary:
    epoch: int  # 1-based, completed
    loss: float
    lr: float
    seconds: float
    images_per_second: float
    metrics: dict[str, float] | None = None

    def line(self, total_epochs: int, primary_name: str) -> str:
        metric = "-" if self.metrics is None else f"{self.metrics.get(primary_name, 0.0):.4f}"
        if self.metrics is not None and MEAN_OKS in self.metrics:
            metric += f" (OKS {self.metrics[MEAN_OKS]:.3f})"
        return (
            f"epoch {self.epoch}/{total_epochs}  loss {self.loss:.6f}  lr {self.lr:.2e}  "
            f"val {primary_name} {metric}  time {self.seconds:.1f}s  "
            f"{self.images_per_second:.1f} img/s"
        )


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    output_dir: Path
    epochs: list[EpochSummary] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # this process's per-step losses

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.output_dir / BEST_CHECKPOINT


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything a run needs from an :class:`ExperimentConfig` and runs it."""

    def __init__(
        self,
        config: ExperimentConfig,
        context: DistContext | None = None,
        resume: str | Path | None = None,
        echo: bool = True,
    ) -> None:
        self.config = config.validate()
        self.writer: Any = None
        self._log_stream: Any = None
        self.context = context or DistContext()
        self.device = self.context.device
        self.model_config: ModelConfig = config.model_config()
        self.output_dir = Path(config.output_dir)
        self.echo = echo and self.context.is_main
        train = config.train
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        if train.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # the published batch is one step's whole batch: split it over the processes
        self.batch_per_process, lr = per_process_batch_size(config, self.context.world_size)
        seed_everything(train.seed)  # same initial weights on every rank

        self.network = self._build_network()
        self.amp = bool(train.amp and self.device.type == "cuda")
        self.network.to(self.device)
        self.model: nn.Module = self.network
        if self.context.distributed:
            if config.model.sync_bn:
                if self.device.type == "cpu":
                    raise TrainingError(
                        "model.sync_bn needs GPUs: SyncBatchNorm does not run on the CPU"
                    )
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(train.lr_steps), gamma=train.lr_factor
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.criterion = build_loss(train.loss)
        self.start_epoch = 0
        self.global_step = 0
        self.best_metric = -1.0
        self.best_epoch = 0
        self.best_metrics: dict[str, float] | None = None

        self.train_records, self.train_images, _ = load_split(
            config.data,
            self.model_config,
            config.data.train_split,
            min_area=config.data.min_person_area,
        )
        if len(self.train_records) == 0:
            raise TrainingError(
                f"no annotated persons in {config.data.root} split {config.data.train_split}"
            )
        self.val_data = load_split(
            config.data, self.model_config, config.data.val_split, config.data.val_boxes
        )
        # Seed RNG per rank for anything outside the per-sample generators.
        seed_everything(train.seed + self.context.rank)
        if resume is not None:
            self._resume(Path(resume))

    # --- setup --------------------------------------------------------------------------------
    def _build_network(self) -> OmniPose:
        """The starting network: an OmniPose checkpoint (either head), else a fresh one with an
        optional ImageNet backbone (see :mod:`omnipose.training.init`)."""
        model_section = self.config.model
        if model_section.pretrained and model_section.init_weights:
            raise TrainingError(
                "model.pretrained (--init imagenet FILE) and model.init_weights (--init FILE) "
                "are two starting points; give one"
            )
        if model_section.init_weights:
            try:
                network, _, _ = load_model(model_section.init_weights, self.model_config.name)
            except CheckpointError as error:
                raise TrainingError(f"--init: {error}") from None
            self._say(f"fine-tuning from {model_section.init_weights}")
            return network.train()
        network = build_model(self.model_config)
        if model_section.pretrained:
            try:
                report = load_imagenet_backbone(network, model_section.pretrained)
            except InitError as error:
                raise TrainingError(str(error)) from None
            self._say(report.summary())
        return network

    def _say(self, message: str) -> None:
        if self.echo:
            tqdm.write(message)
        if self._log_stream is not None:
            self._log_stream.write(message + "\n")
            self._log_stream.flush()

    def _resume(self, path: Path) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise TrainingError(f"resume checkpoint {path} not found") from None
        except Exception as error:
            first = " ".join(str(error).strip().splitlines()[:1])[:200]
            raise TrainingError(f"cannot read resume checkpoint {path}: {first}") from None
        state = payload.get("training_state") if isinstance(payload, dict) else None
        if state is None:
            raise TrainingError(
                f"{path} holds no training state (only weights); resume needs a {LAST_CHECKPOINT} "
                "written by 'omnipose train' (use model.init_weights to fine-tune from weights)"
            )
        stored_name = payload.get("config", {}).get("name")
        if stored_name != self.model_config.name:
            raise TrainingError(
                f"resume checkpoint {path} trains {stored_name} but the config trains "
                f"{self.model_config.name}"
            )
        self.network.load_state_dict(payload["state_dict"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        # the config's hyper-parameters stay in force (the lr is the schedule's position)
        stored_decay = self.optimizer.param_groups[0]["weight_decay"]
        if stored_decay != self.config.train.weight_decay:
            self._say(
                f"resume: weight decay now {self.config.train.weight_decay} "
                f"(the checkpoint's run had {stored_decay})"
            )
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.train.weight_decay
        if _load_scheduler_state(self.scheduler, state["scheduler"]):
            before = sorted(int(k) for k in state["scheduler"]["milestones"])
            self._say(
                f"resume: lr steps now at epochs {list(self.config.train.lr_steps)} "
                f"(the checkpoint's run had {before})"
            )
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = state.get("best_metrics")
        stored_seed = state.get("experiment", {}).get("train", {}).get("seed")
        if stored_seed is not None and int(stored_seed) != self.config.train.seed:
            # shuffling and augmentation are seeded from it: the run's own seed keeps it exact
            self._say(
                f"resume: using the run's seed {stored_seed} (config says {self.config.train.seed})"
            )
            self.config.train.seed = int(stored_seed)
        rng_states = state.get("rng", {})
        own = rng_states.get(str(self.context.rank)) or rng_states.get("0")
        if own is not None:
            restore_rng_state(own)
        self._say(f"resumed from {path}: epoch {self.start_epoch}, step {self.global_step}")

    def _train_loader(self, dataset: KeypointTrainDataset) -> tuple[DataLoader, DistributedSampler]:
        train = self.config.train
        context = self.context
        sampler = DistributedSampler(
            dataset,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=train.seed,
        )
        per_rank = len(sampler)
        fork_safe_opencv(self.config.data.num_workers)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_per_process,
            sampler=sampler,
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
            # a last batch of one crop would break BatchNorm after global pooling
            drop_last=per_rank > self.batch_per_process,
        )
        return loader, sampler

    # --- state ----------------------------------------------------------------------------------
    def _metadata(self, epoch: int) -> dict[str, Any]:
        config = self.config
        return {
            "experiment": config.name,
            "model_config": self.model_config.name,
            "input_size": list(self.model_config.input_size),
            "heatmap_size": list(self.model_config.heatmap_size),
            "training": {
                "data_format": config.data.format,
                "data_root": str(config.data.root),
                "train_split": config.data.train_split,
                "val_split": config.data.val_split,
                "val_boxes": config.data.val_boxes,
                "num_train_persons": len(self.train_records),
                "epochs_completed": epoch,
                "epochs_planned": config.train.epochs,
                "global_step": self.global_step,
                "world_size": self.context.world_size,
                "batch_size_total": self.batch_per_process * self.context.world_size,
                "recipe": config.to_dict(),
            },
            "metrics": self.best_metrics or {},
            "best_epoch": self.best_epoch,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "software": {"torch": torch.__version__},
        }

    def _training_state(self, epoch: int, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": _scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict() if self.amp else {},
            "rng": {str(rank): state for rank, state in enumerate(rng_states)},
            "experiment": self.config.to_dict(),
        }

    def save_last(self, epoch: int) -> Path:
        """``last.pt``: project checkpoint + training state (rank 0 writes it)."""
        from omnipose.training.distributed import gather_objects

        rng_states = gather_objects(capture_rng_state(), self.context)
        path = self.output_dir / LAST_CHECKPOINT
        if self.context.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "config": self.model_config.to_dict(),
                "keypoints": self.model_config.keypoints.to_dict(),
                "metadata": json.loads(json.dumps(self._metadata(epoch))),
                "training_state": self._training_state(epoch, rng_states),
            }
            atomic_torch_save(payload, path)
        return path

    # --- loop -----------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        if not self.context.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._log_stream = open(self.output_dir / LOG_FILE, "a")  # noqa: SIM115 - closed in fit
        if self.config.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _close_logs(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._log_stream is not None:
            self._log_stream.close()
            self._log_stream = None

    def train_one_epoch(
        self,
        epoch: int,
        loader: DataLoader,
        dataset: KeypointTrainDataset,
        sampler: DistributedSampler,
        step_losses: list[float],
    ) -> tuple[float, int, float]:
        """One pass; returns (mean loss over ranks, images seen by all ranks, seconds)."""
        train = self.config.train
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        self.model.train()
        steps = len(loader)
        if train.max_steps_per_epoch is not None:
            steps = min(steps, train.max_steps_per_epoch)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{train.epochs}",
            unit="batch",
            leave=False,
            disable=not (train.progress and self.context.is_main),
        )
        loss_sum, images, done, start = 0.0, 0, 0, time.perf_counter()
        autocast_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        for step, (inputs, targets, weights, _) in enumerate(loader):
            if step >= steps:
                break
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            weights = weights.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=self.amp):
                outputs = self.model(inputs)
            loss = self.criterion(outputs, targets, weights)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            loss_value = float(loss.detach())
            if not np.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at epoch {epoch + 1} step {step + 1}; "
                    "lower train.lr or check the data"
                )
            step_losses.append(loss_value)
            loss_sum += loss_value
            done += 1
            images += int(inputs.shape[0])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.6f}")
            if self.writer is not None and self.global_step % train.log_every == 0:
                self.writer.add_scalar("train/loss", loss_value, self.global_step)
                self.writer.add_scalar(
                    "train/lr", self.optimizer.param_groups[0]["lr"], self.global_step
                )
        bar.close()
        seconds = time.perf_counter() - start
        mean_loss = all_reduce_mean(loss_sum / max(1, done), self.context)
        total_images = int(all_reduce_sum(images, self.context))
        return mean_loss, total_images, seconds

    def _is_improvement(self, metrics: dict[str, float], primary: float) -> bool:
        """Higher AP (or PCKh) wins; equal ones (AP is still 0 early on) fall back to mean OKS."""
        tie_break = metrics.get(MEAN_OKS, 0.0)
        best_tie_break = (self.best_metrics or {}).get(MEAN_OKS, 0.0)
        return (primary, tie_break) > (self.best_metric, best_tie_break)

    def validate(self, keep_samples: int = 0) -> EvalResult:
        result = evaluate_model(
            self.model,
            self.config,
            device=self.device,
            context=self.context,
            progress=self.config.train.progress,
            keep_samples=keep_samples,
            loaded=self.val_data,
        )
        self.model.train()
        return result

    def _log_samples(self, result: EvalResult, epoch: int) -> None:
        if self.writer is None or not result.samples:
            return
        from omnipose.model.render import draw_poses

        for index, (image_rgb, poses) in enumerate(result.samples):
            canvas = draw_poses(
                cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), poses, self.model_config.keypoints
            )
            rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
            self.writer.add_image(f"val/sample_{index}", rgb, epoch, dataformats="HWC")

    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` to ``train.epochs``; returns the run's figures."""
        config, train = self.config, self.config.train
        dataset = KeypointTrainDataset(
            self.train_records,
            self.train_images,
            self.model_config,
            config.data,
            augment=True,
            seed=train.seed,
        )
        loader, sampler = self._train_loader(dataset)
        result = TrainResult(self.best_metric, self.best_epoch, self.output_dir)
        self._open_logs()
        try:
            if self.start_epoch == 0:
                self._say(
                    f"training {config.name}: {self.model_config.name}, "
                    f"{len(dataset)} persons, {self.context.world_size} process(es) on "
                    f"{self.device.type}, batch {self.batch_per_process}/process "
                    f"({self.batch_per_process * self.context.world_size}/step), "
                    f"{train.epochs} epochs -> {self.output_dir}"
                )
            primary_name = "Mean" if config.data.format == "mpii" else "AP"
            for epoch in range(self.start_epoch, train.epochs):
                lr = self.optimizer.param_groups[0]["lr"]
                loss, images, seconds = self.train_one_epoch(
                    epoch, loader, dataset, sampler, result.step_losses
                )
                self.scheduler.step()
                broadcast_buffers(self.network, self.context)  # same model on every rank
                completed = epoch + 1
                metrics = None
                if completed % train.val_every == 0 or completed == train.epochs:
                    evaluation = self.validate(
                        keep_samples=config.test.num_vis_images if self.writer else 0
                    )
                    metrics = evaluation.metrics
                    primary_name = evaluation.primary_name
                    if self._is_improvement(metrics, evaluation.primary):
                        self.best_metric = evaluation.primary
                        self.best_epoch = completed
                        self.best_metrics = dict(metrics)
                        if self.context.is_main:
                            save_checkpoint(
                                self.output_dir / BEST_CHECKPOINT,
                                self.network,
                                self.model_config,
                                self._metadata(completed),
                            )
                    if self.writer is not None:
                        for name, value in metrics.items():
                            self.writer.add_scalar(f"val/{name}", value, completed)
                        self._log_samples(evaluation, completed)
                summary = EpochSummary(
                    completed, loss, lr, seconds, images / max(seconds, 1e-9), metrics
                )
                result.epochs.append(summary)
                if self.writer is not None:
                    self.writer.add_scalar("epoch/loss", loss, completed)
                    self.writer.add_scalar(
                        "epoch/images_per_second", summary.images_per_second, completed
                    )
                self.save_last(completed)
                self._say(summary.line(train.epochs, primary_name))
                barrier()
        finally:
            self._close_logs()
        result.best_metric = float(broadcast_object(self.best_metric, self.context))
        result.best_epoch = self.best_epoch
        return result
