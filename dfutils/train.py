"""Training: `train_one_epoch`, `evaluate` and `fit` with early stopping on the monitored
column (params.monitored: a validation loss or AUC), a checkpoint of the kept epoch, and
the state of the last epoch to resume from."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from dfutils import archs, distributed, paths, runs, sbi, viz
from dfutils.atomic import jsonable, remove_stale_temps, write_csv, write_json
from dfutils.curves import Curves
from dfutils.data import ImageSet, make_loader, train_val_loaders, val_loader
from dfutils.datasets import LABELS
from dfutils.manifest import Sample, check_identity, identity, read_manifest, read_report
from dfutils.metrics import (
    assess,
    binary_metrics,
    choose_threshold,
    grouped,
    headline,
    headline_line,
    video_metrics,
    with_intervals,
)
from dfutils.model import (
    CheckpointError,
    autocast,
    build_model,
    forward,
    grad_scaler,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    to_device,
    train_mode,
    trainable_count,
)
from dfutils.params import Amp, OptimizerName, TrainParams
from dfutils.paths import resolve
from dfutils.progress import tqdm
from dfutils.scoring import score


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs in a row whose value (a loss, or a negated AUC: lower is
    better) is not below best - min_delta."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, loss: float) -> bool:
        """Record one epoch's value; True when it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.bad_epochs = loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= max(self.patience, 1)


@dataclass
class Evaluation:
    """A validation set scored: in the set's order."""

    loss: float  # mean BCE
    labels: np.ndarray  # fake = 1
    scores: np.ndarray  # P(fake)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)  # validation metrics of the best epoch
    threshold: float = 0.5
    best_eval: Evaluation | None = None
    best_blends: Evaluation | None = None  # the self-blends of the kept epoch (fakes="sbi")
    interrupted: bool = False


def mix(images: torch.Tensor, labels: torch.Tensor, alpha: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: each image and label blended with another of the batch, one Beta(alpha, alpha)
    weight per batch (drawn from torch's seeded generator)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(labels))
    return (lam * images + (1 - lam) * images[order.to(images.device)],
            lam * labels + (1 - lam) * labels[order.to(labels.device)])


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, trainable: str | None, desc: str = "train",
                    mixup: float = 0.0, label_smoothing: float = 0.0,
                    after_step: Callable[[], None] | None = None, amp: Amp = "off",
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, accuracy at 0.5, images and seconds.

    `trainable` is the part of the network that trains (the rest stays in eval mode);
    None: `model` is the part that trains, whole (a head on cached features). With mixup
    the targets are blended, and accuracy counts the larger share's label. Label smoothing
    moves the targets towards 0.5 (the loss reported is against them); `after_step` runs
    after every optimiser step (the weight average's update). The forward pass runs in the
    precision `amp` asks for; `scaler` scales float16's loss.
    """
    scaler = scaler or grad_scaler("off", device)
    if trainable is None:
        model.train()
    else:
        train_mode(model, trainable)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, **distributed.quiet_unless_main())
    for images, labels, _ in bar:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        if mixup > 0:
            images, labels = mix(images, labels, mixup)
        logits, _ = forward(model, images, amp=amp)
        loss = loss_fn(logits, labels * (1 - label_smoothing) + label_smoothing / 2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / len(labels)).backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        total_loss += loss.item()
        correct += ((logits >= 0).float() == labels.round()).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        refresh=False)  # the bar redraws at its own pace (mininterval)
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "n": seen,
            "seconds": seconds}


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             desc: str = "val", amp: Amp = "off") -> Evaluation:
    """Mean BCE loss and P(fake) for every image of a labelled set's loader (an ImageSet
    with labels), in eval mode: `scoring.score`, the path every score takes.

    Under torchrun each rank scores its share; the results are gathered, so every rank
    returns the metrics of the whole split (each image once, in the set's order).
    """
    labels = loader.dataset.labels
    found = score(model, loader, device=device, amp=amp, desc=desc)
    unread = next((e for e in found.errors if e), "")
    if unread:
        raise ValueError(f"a validation image could not be read ({unread}): a split holds "
                         "only images it read; run the split again")
    losses = nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(found.logits), torch.from_numpy(labels.astype(np.float32)),
        reduction="none").numpy()
    return Evaluation(float(losses.mean()) if len(losses) else math.nan, labels,
                      found.p_fake)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   name: OptimizerName = "adam") -> torch.optim.Optimizer:
    """Over trainable parameters: Adam (the original recipe's), AdamW when weight decay is
    asked for, or SGD with Nesterov momentum 0.9 (the usual from-scratch choice)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if weight_decay > 0:
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(trainable, lr=lr)


@dataclass
class Learner:
    """The network and how it learns, built in one place from the parameters.

    `model` is the whole network: what is checkpointed. `net` is the part that trains: the
    model, or its head when the frozen backbone's features are cached. The optimiser steps
    `net` through `stepped` (DistributedDataParallel under torchrun), and `average` (a
    moving average of `net`, when params.ema > 0) is what is validated and kept instead.
    """

    model: nn.Module
    net: nn.Module
    stepped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    average: AveragedModel | None
    scaler: torch.amp.GradScaler  # float16's loss scaling (does nothing in other precisions)

    @classmethod
    def build(cls, model: nn.Module, net: nn.Module, params: TrainParams,
              device: torch.device) -> Learner:
        optimizer = make_optimizer(net, params.lr, params.weight_decay, params.optimizer)
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.max_epochs)
                     if params.schedule == "cosine" else None)
        average = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(params.ema),
                                 use_buffers=True) if params.ema > 0 else None)
        # Under torchrun, DDP averages the gradients of the ranks' shares of each global batch.
        stepped = net if distributed.world()[1] == 1 else nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        if params.compile:  # the weights stay the uncompiled module's: checkpoints are alike
            stepped = torch.compile(stepped)
        return cls(model, net, stepped, optimizer, scheduler, average,
                   grad_scaler(params.amp, device))

    @property
    def validated(self) -> nn.Module:
        """The weights that are validated, checkpointed and returned."""
        return self.net if self.average is None else self.average.module

    def after_step(self) -> None:
        if self.average is not None:
            self.average.update_parameters(self.net)

    def kept_state(self) -> dict[str, torch.Tensor]:
        """A copy of the model's weights in which those of `net` are the validated ones."""
        state = self.model.state_dict()
        if self.validated is not self.net:
            prefix = next(name for name, module in self.model.named_modules()
                          if module is self.net)
            state.update({f"{prefix}.{k}" if prefix else k: v
                          for k, v in self.validated.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()}

    def state_dict(self) -> dict:
        """Optimiser, schedule, average and loss scale: with the model's weights, what resumes
        it."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "average": None if self.average is None else self.average.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        if state.get("scaler"):  # last.pt of an earlier version has none: it trained in float32
            self.scaler.load_state_dict(state["scaler"])


class FeatureDataset(Dataset):
    """(pooled backbone features, label, index): what the head of a frozen model sees."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray):
        self.features, self.labels = features, torch.tensor(labels, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[index], self.labels[index], index


@torch.inference_mode()
def backbone_features(model: nn.Module, loader: DataLoader, device: torch.device,
                      desc: str = "features", amp: Amp = "off") -> torch.Tensor:
    """Everything but the head, run once over a loader's dataset (in order, in eval mode):
    each image's pooled features."""
    parts = []
    head = archs.of(model).head_module(model)
    # The head's input is what it learns from, whatever comes before it (a CNN's pooled
    # map, a transformer's normalised class token): taken as the whole network runs.
    handle = head.register_forward_pre_hook(lambda module, inputs: parts.append(
        inputs[0].float().cpu()))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=False,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)
    try:
        with autocast(amp, device):
            for batch in tqdm(ordered, desc=desc, unit="batch", leave=False):
                model(to_device(batch[0], device))
    finally:
        handle.remove()
        for module, training in modes:
            module.train(training)
    return torch.cat(parts)


@dataclass
class Outputs:
    """Where a training run writes (None: nowhere) and what goes into its checkpoints."""

    checkpoint: str | os.PathLike | None = None  # the kept epoch: model.pt
    last: str | os.PathLike | None = None  # the last completed epoch: last.pt
    faces: dict | None = None  # the faces step's parameters, when the images are its crops
    split: dict | None = None  # the split trained on (split.identity)
    resumed: dict | None = None  # last.pt as read_checkpoint(resume=True) gave it, if read
    curves: Curves | None = None  # TensorBoard's event files, a point per curve each epoch


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, params: TrainParams,
        checkpoint: str | os.PathLike | None = None, device: torch.device | None = None,
        last: str | os.PathLike | None = None, faces: dict | None = None,
        blends_loader: DataLoader | None = None, resumed: dict | None = None,
        split: dict | None = None, curves: Curves | None = None) -> FitResult:
    """Train until the monitored column stops improving; keep (and save) the best epoch.

    Each new best is written to `checkpoint` at once, with its threshold and metrics, so
    Ctrl-C (or a crash) at any point leaves the best model so far on disk; the state after
    every completed epoch goes to `last`, which `params.resume` continues from. On return
    the model holds the kept weights. Under torchrun, only rank 0 writes, validation metrics
    cover the whole split, and rank 0's early-stopping decision holds for all ranks.
    With `params.ema` an exponential moving average of the weights (and BatchNorm
    statistics) is updated after every step, and it is what is validated and kept.
    `faces` (the faces step's parameters, when the images are its crops) and `split` (the
    split's identity, which a resume checks) go into the checkpoint. `blends_loader`
    (fakes="sbi": the validation reals and their self-blends) is scored every epoch too,
    as `sbi_loss` and `sbi_auc`; `params.monitored` names the history column that early
    stopping and the kept epoch follow. `resumed` is `last` already read (by the caller,
    to refuse early); without it a resume reads `last`. `curves` hears each epoch's row.
    """
    device = device or distributed.device()
    model.to(device, memory_format=torch.channels_last)
    samples = val_samples(val_loader)
    groups = np.array([s.video for s in samples]) if samples else None
    outputs = Outputs(checkpoint, last, faces, split, resumed, curves)
    if params.caches_features:
        return fit_head(model, train_loader, val_loader, params, device, outputs, groups)
    return train_loop(Learner.build(model, model, params, device), train_loader, val_loader,
                      params, device, outputs, groups, blends_loader)


def fit_head(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
             params: TrainParams, device: torch.device, outputs: Outputs,
             groups: np.ndarray | None = None) -> FitResult:
    """A frozen backbone without augmentation computes the same features every epoch: compute
    them once and train the head on them. The feature loaders come from `make_loader` with
    the image loaders' batch size and seed, so they draw the same shuffles, and the results
    equal those of training on images (tested)."""
    train = FeatureDataset(backbone_features(model, train_loader, device, "train features",
                                             params.amp),
                           np.array([s.label for s in train_loader.dataset.samples]))
    val = ImageSet(list(backbone_features(model, val_loader, device, "val features",
                                          params.amp)), labels=val_loader.dataset.labels)
    features = [make_loader(dataset, params.batch_size, shuffle=dataset is train,
                            seed=params.seed) for dataset in (train, val)]
    head = archs.of(model).head_module(model)
    return train_loop(Learner.build(model, head, params, device), *features, params, device,
                      outputs, groups)


def val_samples(loader: DataLoader) -> list[Sample]:
    """The labelled samples a validation loader scores ([] when it scores other things)."""
    return getattr(loader.dataset, "samples", [])


def validate(learner: Learner, val_loader: DataLoader, blends_loader: DataLoader | None,
             params: TrainParams, device: torch.device, groups: np.ndarray | None
             ) -> tuple[Evaluation, Evaluation | None, float, dict]:
    """Score the validated weights on the validation set (and the self-blends): the two
    evaluations, the decision threshold (chosen on the set the monitored column comes
    from) and the metrics at it, video-level ones when a group holds several images."""
    val = evaluate(learner.validated, val_loader, device, amp=params.amp)
    blends = (None if blends_loader is None else
              evaluate(learner.validated, blends_loader, device, desc="val self-blends",
                       amp=params.amp))
    watched = blends if params.monitored.startswith("sbi_") else val
    threshold = choose_threshold(params.threshold, watched.labels, watched.scores)
    metrics = binary_metrics(val.labels, val.scores, threshold)
    if grouped(groups):
        metrics["video"] = video_metrics(groups, val.labels, val.scores, threshold)
    if blends is not None:
        metrics["sbi"] = {**binary_metrics(blends.labels, blends.scores, threshold),
                          "loss": blends.loss}
    return val, blends, threshold, metrics


def history_row(epoch: int, train: dict, val: Evaluation, blends: Evaluation | None,
                metrics: dict, lr: float, seconds: float) -> dict:
    """One line of history.csv."""
    return {
        "epoch": epoch,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val.loss,
        "val_acc": metrics["accuracy"],
        "val_auc": metrics["auc"],
        **({"val_video_auc": metrics["video"]["auc"]} if "video" in metrics else {}),
        **({"sbi_loss": blends.loss, "sbi_auc": metrics["sbi"]["auc"],
            "mean_loss": (val.loss + blends.loss) / 2,
            "mean_auc": (metrics["auc"] + metrics["sbi"]["auc"]) / 2}
           if blends is not None else {}),
        "lr": lr,
        "seconds": seconds,
        "images_per_s": train["n"] / train["seconds"] if train["seconds"] else math.nan,
    }


def train_loop(learner: Learner, train_loader: DataLoader, val_loader: DataLoader,
               params: TrainParams, device: torch.device, outputs: Outputs,
               groups: np.ndarray | None = None, blends_loader: DataLoader | None = None
               ) -> FitResult:
    """The epochs of `fit`: `learner.net` learns from `train_loader`; the whole model is
    what is checkpointed. `groups` (per validation image, in dataset order) adds video-level
    metrics when a group holds several images."""
    rank, _ = distributed.world()
    stopper = EarlyStopping(params.patience, params.min_delta)
    result, best_state, first = FitResult(), None, 1
    if params.resume:
        first, best_state = restore(outputs, learner, stopper, result, params, train_loader)
    log = tqdm.write if rank == 0 else (lambda message: None)
    try:
        for epoch in range(first, params.max_epochs + 1):
            if stopper.should_stop:  # a resumed run that had already stopped early
                break
            lr = learner.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            train = train_epoch(learner, train_loader, params, device, epoch)
            val, blends, threshold, metrics = validate(learner, val_loader, blends_loader,
                                                       params, device, groups)
            if learner.scheduler is not None:
                learner.scheduler.step()
            row = history_row(epoch, train, val, blends, metrics, lr, time.perf_counter() - start)
            result.history.append(row)
            if outputs.curves is not None:  # before last.pt: a resume purges what it redoes
                outputs.curves.epoch(row)
            watch = row[params.monitored]
            improved = stopper.step(watch if params.monitored.endswith("_loss") else -watch)
            log(epoch_line(row, improved))
            if improved:
                best_state = learner.kept_state()
                result.best_epoch, result.threshold, result.best_eval = epoch, threshold, val
                result.best_blends = blends
                result.metrics = {**metrics, "val_loss": val.loss, "best_epoch": epoch,
                                  "threshold_rule": params.threshold,
                                  "monitor": params.monitored}
                if outputs.checkpoint is not None and rank == 0:
                    save_checkpoint(outputs.checkpoint, best_state, params=params.to_dict(),
                                    threshold=threshold, threshold_rule=params.threshold,
                                    metrics=result.metrics, epoch=epoch, faces=outputs.faces,
                                    split=outputs.split)
            if outputs.last is not None and rank == 0:
                save_last(outputs, epoch, learner, stopper, result, params)
            if distributed.broadcast_flag(stopper.should_stop):
                log(f"early stop: no better {params.monitored} for {stopper.bad_epochs} "
                    f"epochs; keeping epoch {result.best_epoch}")
                break
    except KeyboardInterrupt:
        result.interrupted = True
        log(f"interrupted: keeping the best epoch so far ({result.best_epoch or 'none'}); "
            "resume=True continues from the last completed epoch")
    if best_state is not None:
        learner.model.load_state_dict(best_state)
    return result


def train_epoch(learner: Learner, loader: DataLoader, params: TrainParams, device: torch.device,
                epoch: int) -> dict[str, float]:
    """One epoch of `train_one_epoch`, its loss and accuracy summed over every rank's share."""
    loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, alike on all ranks
    train = train_one_epoch(learner.stepped, loader, learner.optimizer, device,
                            params.trainable if learner.net is learner.model else None,
                            desc=f"epoch {epoch}/{params.max_epochs}", mixup=params.mixup,
                            label_smoothing=params.label_smoothing,
                            after_step=None if learner.average is None else learner.after_step,
                            amp=params.amp, scaler=learner.scaler)
    if distributed.world()[1] > 1:
        n, loss, acc = distributed.gather_arrays(
            np.array([train["n"]]), np.array([train["loss"] * train["n"]]),
            np.array([train["acc"] * train["n"]]))
        train.update(n=int(n.sum()), loss=loss.sum() / n.sum(), acc=acc.sum() / n.sum())
    return train


def epoch_line(row: dict, improved: bool) -> str:
    """The training log's line for one epoch."""
    sbi = (f"  self-blends loss {row['sbi_loss']:.4f} auc {row['sbi_auc']:.4f}"
           if "sbi_loss" in row else "")
    return (f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.3f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
            f"auc {row['val_auc']:.4f}{sbi}  {row['seconds']:.1f}s{'  *best' if improved else ''}")


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                      *numpy_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_last(outputs: Outputs, epoch: int, learner: Learner, stopper: EarlyStopping,
              result: FitResult, params: TrainParams) -> None:
    """The checkpoint after `epoch`, with the training state: optimiser, schedule, average,
    early stopping, the history so far and the random number generators; atomic."""
    best = result.best_eval
    training = {
        "learner": learner.state_dict(),
        "stopper": {"best": stopper.best, "bad_epochs": stopper.bad_epochs},
        "history": jsonable(result.history), "best_epoch": result.best_epoch,
        "best_eval": _evaluation_state(best),
        "best_blends": _evaluation_state(result.best_blends),
        "rng": _rng_state(),
    }
    save_checkpoint(outputs.last, learner.model, params=params.to_dict(),
                    threshold=result.threshold, threshold_rule=params.threshold,
                    metrics=jsonable(result.metrics), epoch=epoch, faces=outputs.faces,
                    training=training, split=outputs.split)


# What a last.pt whose training state was altered raises while it is put back.
DAMAGED = (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError)


def _damaged(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot resume from {path}: its training state is damaged "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                           "train again without RESUME=1")


def restore(outputs: Outputs, learner: Learner, stopper: EarlyStopping, result: FitResult,
            params: TrainParams, train_loader: DataLoader
            ) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Put everything back as it was after the last completed epoch; return the next epoch
    and the best weights so far.

    DataLoader workers keep their random state between epochs, and it cannot be copied out
    of them; so the data loading (not the training) of the completed epochs is replayed,
    which leaves every worker where it was. The main process's generators are then set
    back. The resumed history is the one an uninterrupted run has (tested on the CPU).
    """
    if outputs.last is None:
        raise ValueError("resume needs the path of last.pt")
    state = outputs.resumed or read_checkpoint(outputs.last, resume=True)
    path, training = resolve(outputs.last), state["training"]
    # A parameter newer than the checkpoint was at its default (a new parameter's default is
    # what the toolkit did before it). Whether curves are written changes no result.
    defaults, recorded = type(params).defaults(), type(params).current(state["params"])
    changed = sorted(k for k, v in params.to_dict().items()
                     if k not in ("resume", "tensorboard") and recorded.get(k, defaults[k]) != v)
    if changed:
        raise ValueError(f"cannot resume {path.parent}: it was trained with other values of "
                         f"{', '.join(changed)}; resume with the parameters it recorded")
    check_identity(state.get("split"), params.data_dir, path, "resume")
    try:
        learner.model.load_state_dict(state["model_state"])
        learner.load_state_dict(training["learner"])
        stopper.best, stopper.bad_epochs = (training["stopper"]["best"],
                                            training["stopper"]["bad_epochs"])
        result.history, result.best_epoch = training["history"], training["best_epoch"]
        result.threshold, result.metrics = state["threshold"], state["metrics"]
        result.best_eval = _evaluation_from(training["best_eval"])
        result.best_blends = _evaluation_from(training.get("best_blends"))
        rng = training["rng"]
    except DAMAGED as error:
        raise _damaged(path, error) from None
    best_state = (load_checkpoint(outputs.checkpoint).model.state_dict()
                  if outputs.checkpoint is not None and result.best_epoch else None)
    if train_loader.num_workers > 0:
        for epoch in tqdm(range(1, state["epoch"] + 1), desc="replaying data loading",
                          unit="epoch", leave=False):
            train_loader.sampler.set_epoch(epoch)
            for _ in train_loader:
                pass
    try:
        _set_rng_state(rng)
    except DAMAGED as error:
        raise _damaged(path, error) from None
    tqdm.write(f"resuming {path.parent} after epoch {state['epoch']}")
    return state["epoch"] + 1, best_state


def _evaluation_state(evaluation: Evaluation | None) -> dict | None:
    """An Evaluation as tensors, for last.pt."""
    if evaluation is None:
        return None
    return {"loss": evaluation.loss,
            "labels": torch.from_numpy(evaluation.labels.astype(np.int64)),
            "scores": torch.from_numpy(np.asarray(evaluation.scores, dtype=np.float64))}


def _evaluation_from(state: dict | None) -> Evaluation | None:
    if state is None:
        return None
    return Evaluation(state["loss"], state["labels"].numpy(), state["scores"].numpy())


def metrics_with_intervals(result: FitResult, videos: list[str], n_resamples: int) -> dict:
    """The kept epoch's metrics with 95% bootstrap intervals (`ci`), as every evaluation
    gives them (`metrics.assess`: whole videos resampled, then the videos'), and the
    self-blends'."""
    best = result.best_eval
    m = {**result.metrics, **assess(best.labels, best.scores, videos, result.threshold,
                                    n_resamples)}
    if "sbi" in m and result.best_blends is not None:
        m["sbi"] = with_intervals(m["sbi"], result.best_blends.labels,
                                  result.best_blends.scores, None, n_resamples)
    return m


def save_outputs(run_dir: str | os.PathLike, result: FitResult, samples: list[Sample],
                 data_dir: str | os.PathLike, n_resamples: int) -> dict:
    """history.csv, metrics.json (with intervals), val_predictions.csv and the figures of
    the validation `samples`; returns the figures."""
    if not result.history or result.best_eval is None:
        raise RuntimeError("training stopped before the first epoch finished; nothing to save")
    out, data_dir = resolve(run_dir), resolve(data_dir)
    write_csv(out / paths.HISTORY, result.history)
    best = result.best_eval
    videos = [s.video for s in samples]
    result.metrics = metrics_with_intervals(result, videos, n_resamples)
    write_json(out / paths.METRICS, {**result.metrics, "interrupted": result.interrupted,
                                     "epochs_run": len(result.history)})
    m = result.metrics
    write_csv(out / paths.PREDICTIONS,
              [{"path": s.path.relative_to(data_dir).as_posix(), "label": int(label),
                "p_fake": float(p), "group": s.group, "video": s.video}
               for s, label, p in zip(samples, best.labels, best.scores, strict=True)])
    figures = dict(zip(paths.TRAIN_FIGURES, (
        viz.plot_history(result.history, result.best_epoch),
        viz.plot_roc(best.labels, best.scores, groups=videos),
        viz.plot_confusion(m["confusion"], m["threshold"]),
        viz.plot_score_hist(best.labels, best.scores, m["threshold"])), strict=True))
    for name, fig in figures.items():
        viz.save_figure(fig, out / name)
    return figures


def check_classes(params: TrainParams) -> None:
    """Refuse a split this training cannot learn or validate on: with fakes="data" the train
    and val splits must each hold both classes (a split of a data set whose fakes all went
    to one side trained to "done" with a NaN AUC)."""
    if params.fakes != "data":
        return  # self-blends make the fakes; "sbi+data" checks the split's own (sbi.loaders)
    for split in ("train", "val"):
        labels = {s.label for s in read_manifest(params.data_dir, split)}
        missing = [name for name, value in LABELS.items() if value not in labels]
        if missing:
            raise ValueError(f"the {split} split of {resolve(params.data_dir)} has no "
                             f"{missing[0]} image: fakes=\"data\" learns and validates on both "
                             "classes; split again (the split report says which class each "
                             "split lacks), or train from its reals with fakes=\"sbi\"")


def preflight(params: TrainParams, chain: dict) -> None:
    """02-train's checks before anything is written: the split's classes, when the split is
    not made in the same chain."""
    if "01-split" not in chain:
        check_classes(params)


def train_run(params: TrainParams) -> tuple[FitResult, dict]:
    """The 02-train step, for the notebook and the `train` command alike (one process or a
    torchrun rank): the result and its figures.

    Only rank 0 writes: model.pt, last.pt while the run can be resumed, history, metrics,
    predictions and figures.
    """
    check_classes(params)
    runs.seed_everything(params.seed)
    rank, _ = distributed.world()
    out = resolve(params.run_dir)
    # Read once, before the loaders are built: "nothing to resume" comes first.
    resumed = read_checkpoint(out / paths.LAST, resume=True) if params.resume else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # of a killed earlier run
    blends_loader, blends, found = None, None, None
    if params.self_blends:
        train_loader, blends_loader, blends, found = sbi.loaders(params)
        loader = val_loader(params)
        if rank == 0:
            tqdm.write(sbi.describe(found))
    else:
        train_loader, loader = train_val_loaders(params)
    # Resuming loads every weight from last.pt: pretrained weights are not needed again.
    model = build_model(params.arch, None if params.resume else params.weights,
                        params.trainable, params.image_size)
    counted = parameters(model)
    if rank == 0:
        tqdm.write(f"{params.arch}, weights: {params.weights}; trainable: {params.trainable} "
                   f"({parameters_text(counted)}); device: {distributed.device()}; "
                   f"outputs: {out}")
    faces = (read_report(params.data_dir) or {}).get("faces")
    curves = (Curves(out, first_epoch=int(resumed["epoch"]) + 1 if resumed else 1)
              if params.tensorboard and rank == 0 else None)
    result = fit(model, train_loader, loader, params, checkpoint=out / paths.MODEL,
                 device=distributed.device(), last=out / paths.LAST, faces=faces,
                 blends_loader=blends_loader, resumed=resumed, split=identity(params.data_dir),
                 curves=curves)
    result.metrics["parameters"] = counted
    if found is not None:
        result.metrics["self_blend_faces"] = found
    figures = {}
    if rank == 0:
        figures = save_outputs(out, result, val_samples(loader), params.data_dir,
                               params.n_bootstrap)
        if blends is not None:
            figures[paths.SELF_BLENDS] = sbi.plot_examples(blends)
            viz.save_figure(figures[paths.SELF_BLENDS], out / paths.SELF_BLENDS)
        if not result.interrupted:
            (out / paths.LAST).unlink(missing_ok=True)  # finished: nothing left to resume
    if curves is not None:
        if figures and result.best_epoch:
            curves.figure("roc", figures[paths.TRAIN_FIGURES[1]], result.best_epoch)
        curves.close()
    return result, figures


def parameters(model: nn.Module) -> dict:
    """How many of the network's parameters train, of how many, and their share."""
    trained, total = trainable_count(model)
    return {"trainable": trained, "total": total, "share": trained / total}


def parameters_text(counted: dict) -> str:
    """`0.77 M of 85.8 M parameters train (0.9 %)`."""
    return (f"{counted['trainable'] / 1e6:.3g} M of {counted['total'] / 1e6:.3g} M parameters "
            f"train ({100 * counted['share']:.3g} %)")


def record(params: TrainParams) -> dict | None:
    """What run.json keeps of a finished 02-train: its metrics.json."""
    path = resolve(params.run_dir) / paths.METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def status(result: tuple[FitResult, dict]) -> str:
    """How a training ended: done, or interrupted (Ctrl-C) with the best epoch kept."""
    return "interrupted" if result[0].interrupted else "done"


def resumed(params: dict) -> dict:
    """Recorded parameters that continue an interrupted run: from its last.pt when it saved
    one (the last completed epoch), else from the start."""
    return {**params, "resume": (resolve(params["run_dir"]) / paths.LAST).is_file()}


def summary(record: dict) -> dict:
    """A run's headline numbers from 02-train: validation metrics with their 95% intervals,
    per image, per video and on the self-blends, and the kept epoch."""
    return {**headline("val", record), **headline("val_video", record.get("video") or {}),
            "best_epoch": record.get("best_epoch"),
            **headline("sbi", record.get("sbi") or {}),
            "parameters": record.get("parameters")}


def summary_lines(summary: dict) -> list[str]:
    """02-train's headline numbers in words."""
    lines = []
    if summary.get("val_auc") is not None:
        lines.append(f"validation (epoch {summary['best_epoch']}): "
                     f"{headline_line('val', summary)}")
    if summary.get("val_video_auc") is not None:
        lines.append(f"validation videos: {headline_line('val_video', summary)}")
    if summary.get("sbi_auc") is not None:
        lines.append(f"validation self-blends: {headline_line('sbi', summary)}")
    if summary.get("parameters"):
        lines.append(parameters_text(summary["parameters"]))
    return lines
