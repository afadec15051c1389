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

import datetime
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from omnipose.training.config import (
    DataSection,
    ExperimentConfig,
    ModelSection,
    TrainSection,
    per_process_batch_size,
)
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
from omnipose.training.run_log import RunLog
from omnipose.training.run_state import (
    capture_rng_state,
    load_scheduler_state,
    restore_rng_state,
    scheduler_state,
)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "model_best.pt"


class TrainingError(Exception):
    """A training run cannot start or continue; the message is one line."""


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


def configure_torch(train: TrainSection, device: torch.device) -> None:
    """Thread count and determinism settings of a run (cuDNN autotuning when not deterministic)."""
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def starting_network(
    model_section: ModelSection, model_config: ModelConfig, log: RunLog
) -> OmniPose:
    """The starting network: an OmniPose checkpoint (either head), else a fresh one with an
    optional ImageNet backbone (see :mod:`omnipose.training.init`)."""
    if model_section.pretrained and model_section.init_weights:
        raise TrainingError(
            "model.pretrained (--init imagenet FILE) and model.init_weights (--init FILE) "
            "are two starting points; give one"
        )
    if model_section.init_weights:
        try:
            network, _, _ = load_model(model_section.init_weights, model_config.name)
        except CheckpointError as error:
            raise TrainingError(f"--init: {error}") from None
        log.say(f"fine-tuning from {model_section.init_weights}")
        return network.train()
    network = build_model(model_config)
    if model_section.pretrained:
        try:
            report = load_imagenet_backbone(network, model_section.pretrained)
        except InitError as error:
            raise TrainingError(str(error)) from None
        log.say(report.summary())
    return network


def for_processes(network: OmniPose, context: DistContext, sync_bn: bool) -> nn.Module:
    """The module the loop runs: ``network`` itself, or under ``torchrun`` the network wrapped in
    DistributedDataParallel (its BatchNorm synchronised across GPUs when ``sync_bn``)."""
    model: nn.Module = network
    if context.distributed:
        device = context.device
        if sync_bn:
            if device.type == "cpu":
                raise TrainingError(
                    "model.sync_bn needs GPUs: SyncBatchNorm does not run on the CPU"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
        )
    return model


def read_resume_checkpoint(path: Path, model_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The payload of a ``last.pt`` and its training state, checked to train ``model_name``."""
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
    if stored_name != model_name:
        raise TrainingError(
            f"resume checkpoint {path} trains {stored_name} but the config trains {model_name}"
        )
    return payload, state


def train_loader(
    dataset: KeypointTrainDataset,
    data: DataSection,
    seed: int,
    context: DistContext,
    batch_per_process: int,
) -> tuple[DataLoader, DistributedSampler]:
    """This process's share of each epoch, shuffled per epoch from ``seed``."""
    sampler = DistributedSampler(
        dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=seed,
    )
    per_rank = len(sampler)
    fork_safe_opencv(data.num_workers)
    loader = DataLoader(
        dataset,
        batch_size=batch_per_process,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=context.device.type == "cuda",
        # a last batch of one crop would break BatchNorm after global pooling
        drop_last=per_rank > batch_per_process,
    )
    return loader, sampler


def run_metadata(
    config: ExperimentConfig,
    model_config: ModelConfig,
    *,
    epoch: int,
    global_step: int,
    num_train_persons: int,
    world_size: int,
    batch_size_total: int,
    best_metrics: dict[str, float] | None,
    best_epoch: int,
) -> dict[str, Any]:
    """The ``metadata`` of a run's checkpoints: what was trained on what, how far, how well."""
    return {
        "experiment": config.name,
        "model_config": model_config.name,
        "input_size": list(model_config.input_size),
        "heatmap_size": list(model_config.heatmap_size),
        "training": {
            "data_format": config.data.format,
            "data_root": str(config.data.root),
            "train_split": config.data.train_split,
            "val_split": config.data.val_split,
            "val_boxes": config.data.val_boxes,
            "num_train_persons": num_train_persons,
            "epochs_completed": epoch,
            "epochs_planned": config.train.epochs,
            "global_step": global_step,
            "world_size": world_size,
            "batch_size_total": batch_size_total,
            "recipe": config.to_dict(),
        },
        "metrics": best_metrics or {},
        "best_epoch": best_epoch,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__},
    }


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
        self.context = context or DistContext()
        self.device = self.context.device
        self.model_config: ModelConfig = config.model_config()
        self.output_dir = Path(config.output_dir)
        self.log = RunLog(echo and self.context.is_main)
        train = config.train
        configure_torch(train, self.device)
        # the published batch is one step's whole batch: split it over the processes
        self.batch_per_process, lr = per_process_batch_size(config, self.context.world_size)
        seed_everything(train.seed)  # same initial weights on every rank

        self.network = starting_network(config.model, self.model_config, self.log)
        self.amp = bool(train.amp and self.device.type == "cuda")
        self.network.to(self.device)
        self.model = for_processes(self.network, self.context, config.model.sync_bn)
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

    def _resume(self, path: Path) -> None:
        payload, state = read_resume_checkpoint(path, self.model_config.name)
        self.network.load_state_dict(payload["state_dict"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        # the config's hyper-parameters stay in force (the lr is the schedule's position)
        stored_decay = self.optimizer.param_groups[0]["weight_decay"]
        if stored_decay != self.config.train.weight_decay:
            self.log.say(
                f"resume: weight decay now {self.config.train.weight_decay} "
                f"(the checkpoint's run had {stored_decay})"
            )
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.train.weight_decay
        if load_scheduler_state(self.scheduler, state["scheduler"]):
            before = sorted(int(k) for k in state["scheduler"]["milestones"])
            self.log.say(
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
            self.log.say(
                f"resume: using the run's seed {stored_seed} (config says {self.config.train.seed})"
            )
            self.config.train.seed = int(stored_seed)
        rng_states = state.get("rng", {})
        own = rng_states.get(str(self.context.rank)) or rng_states.get("0")
        if own is not None:
            restore_rng_state(own)
        self.log.say(f"resumed from {path}: epoch {self.start_epoch}, step {self.global_step}")

    # --- state ----------------------------------------------------------------------------------
    def _metadata(self, epoch: int) -> dict[str, Any]:
        return run_metadata(
            self.config,
            self.model_config,
            epoch=epoch,
            global_step=self.global_step,
            num_train_persons=len(self.train_records),
            world_size=self.context.world_size,
            batch_size_total=self.batch_per_process * self.context.world_size,
            best_metrics=self.best_metrics,
            best_epoch=self.best_epoch,
        )

    def _training_state(self, epoch: int, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
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
            if self.log.tensorboard and self.global_step % train.log_every == 0:
                self.log.scalar("train/loss", loss_value, self.global_step)
                self.log.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
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
        loader, sampler = train_loader(
            dataset, config.data, train.seed, self.context, self.batch_per_process
        )
        result = TrainResult(self.best_metric, self.best_epoch, self.output_dir)
        if self.context.is_main:
            self.log.open(self.output_dir, train.tensorboard)
        try:
            if self.start_epoch == 0:
                self.log.say(
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
                        keep_samples=config.test.num_vis_images if self.log.tensorboard else 0
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
                    for name, value in metrics.items():
                        self.log.scalar(f"val/{name}", value, completed)
                    self.log.samples(evaluation, completed, self.model_config.keypoints)
                summary = EpochSummary(
                    completed, loss, lr, seconds, images / max(seconds, 1e-9), metrics
                )
                result.epochs.append(summary)
                self.log.scalar("epoch/loss", loss, completed)
                self.log.scalar("epoch/images_per_second", summary.images_per_second, completed)
                self.save_last(completed)
                self.log.say(summary.line(train.epochs, primary_name))
                barrier()
        finally:
            self.log.close()
        result.best_metric = float(broadcast_object(self.best_metric, self.context))
        result.best_epoch = self.best_epoch
        return result
