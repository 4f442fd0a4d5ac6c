"""Training: `train_one_epoch`, `evaluate` and `fit` with early stopping on validation loss,
a checkpoint of the best epoch, and the state of the last epoch to resume from."""

from __future__ import annotations

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

from dfutils import distributed
from dfutils.data import make_loader
from dfutils.metrics import binary_metrics, choose_threshold, grouped, video_metrics
from dfutils.model import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    train_mode,
)
from dfutils.params import OptimizerName, TrainParams
from dfutils.paths import atomic_path, jsonable, remove_stale_temps, resolve, write_csv, write_json
from dfutils.progress import tqdm

# What a training run writes into its run_dir (model.pt is model.CHECKPOINT_FILE).
LAST = "last.pt"  # the state after the last completed epoch, while the run can be resumed
HISTORY = "history.csv"
METRICS = "metrics.json"
PREDICTIONS = "val_predictions.csv"
FIGURES = ("curves.png", "roc.png", "confusion.png", "scores.png")
SELF_BLENDS = "self_blends.png"  # fakes="sbi": validation reals, their blends and masks


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; images (4-D) in channels-last layout, which ResNet runs faster in
    (the README's Performance section has the measurement)."""
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs in a row whose loss is not below best - min_delta."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, loss: float) -> bool:
        """Record one epoch's validation loss; True when it is the new best."""
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
    loss: float  # mean BCE
    labels: np.ndarray  # fake = 1
    scores: np.ndarray  # P(fake)
    indices: np.ndarray  # positions in the dataset


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)  # validation metrics of the best epoch
    threshold: float = 0.5
    best_eval: Evaluation | None = None
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
                    device: torch.device, trainable: str = "all", desc: str = "train",
                    mixup: float = 0.0, label_smoothing: float = 0.0,
                    after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, accuracy at 0.5, images and seconds.

    With mixup the targets are blended, and accuracy counts the larger share's label.
    Label smoothing moves the targets towards 0.5 (the loss reported is against them);
    `after_step` runs after every optimiser step (the weight average's update).
    """
    train_mode(model.module if hasattr(model, "module") else model, trainable)  # DDP wraps
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, **distributed.quiet_unless_main())
    for images, labels, _ in bar:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        if mixup > 0:
            images, labels = mix(images, labels, mixup)
        logits = model(images).squeeze(1)
        loss = loss_fn(logits, labels * (1 - label_smoothing) + label_smoothing / 2)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(labels)).backward()
        optimizer.step()
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


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             desc: str = "val") -> Evaluation:
    """Mean BCE loss and P(fake) for every image of `loader`'s dataset, in eval mode.

    Under torchrun each rank scores its share; the results are gathered, so every rank
    returns the metrics of the whole split (each image once, in dataset order).
    """
    model.eval()
    parts = []
    for images, labels, indices in tqdm(loader, desc=desc, unit="batch", leave=False,
                                        **distributed.quiet_unless_main()):
        logits = model(to_device(images, device)).reshape(-1).float().cpu()
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        parts.append((losses.numpy(), labels.numpy(), torch.sigmoid(logits).numpy(),
                      indices.numpy()))
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [
        np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)]
    losses, labels, scores, indices = distributed.gather_arrays(*columns)
    # DistributedSampler pads the last round with repeats: keep each image once.
    indices, first = np.unique(indices, return_index=True)
    losses, labels, scores = losses[first], labels[first], scores[first]
    return Evaluation(float(losses.mean()) if len(losses) else math.nan, labels.astype(int),
                      scores, indices)


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
class Optimization:
    """How `net` (the model, or its head) learns: optimizer, schedule and weight average,
    built in one place from the parameters, and saved and restored together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    average: AveragedModel | None  # the weights validated and kept, when params.ema > 0

    @classmethod
    def build(cls, net: nn.Module, params: TrainParams) -> Optimization:
        optimizer = make_optimizer(net, params.lr, params.weight_decay, params.optimizer)
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.max_epochs)
                     if params.schedule == "cosine" else None)
        average = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(params.ema),
                                 use_buffers=True) if params.ema > 0 else None)
        return cls(optimizer, scheduler, average)

    def validated(self, net: nn.Module) -> nn.Module:
        """The weights that are validated, checkpointed and returned."""
        return net if self.average is None else self.average.module

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])


class FeatureDataset(Dataset):
    """(pooled backbone features, label, index): what the head of a frozen model sees."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        order = torch.argsort(indices)
        self.features, self.labels = features[order], labels[order]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[index], self.labels[index], index


@torch.inference_mode()
def backbone_features(model: nn.Module, loader: DataLoader, device: torch.device,
                      desc: str = "features") -> FeatureDataset:
    """Run everything but `fc` once over a loader's dataset (in order, in eval mode)."""
    backbone = nn.Sequential(*(m for name, m in model.named_children() if name != "fc"),
                             nn.Flatten())
    backbone.eval()
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=False,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)
    parts = [(backbone(to_device(images, device)).float().cpu(), labels, indices)
             for images, labels, indices in tqdm(ordered, desc=desc, unit="batch", leave=False)]
    features, labels, indices = (torch.cat(p) for p in zip(*parts, strict=True))
    return FeatureDataset(features, labels, indices)


def kept_state(model: nn.Module, net: nn.Module, validated: nn.Module
               ) -> dict[str, torch.Tensor]:
    """A copy of `model`'s weights in which those of `net` (the model, or its head when
    features are cached) come from `validated`: `net` itself or its moving average."""
    state = model.state_dict()
    if validated is not net:
        prefix = next(name for name, module in model.named_modules() if module is net)
        state.update({f"{prefix}.{k}" if prefix else k: v
                      for k, v in validated.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, params: TrainParams,
        checkpoint: str | os.PathLike | None = None, device: torch.device | None = None,
        last: str | os.PathLike | None = None, faces: dict | None = None,
        blends_loader: DataLoader | None = None) -> FitResult:
    """Train until validation loss stops improving; keep (and save) the best epoch's weights.

    Each new best is written to `checkpoint` at once, with its threshold and metrics, so
    Ctrl-C (or a crash) at any point leaves the best model so far on disk; the state after
    every completed epoch goes to `last`, which `params.resume` continues from. On return
    the model holds the best weights. Under torchrun, only rank 0 writes, validation metrics
    cover the whole split, and rank 0's early-stopping decision holds for all ranks.
    With `params.ema` an exponential moving average of the weights (and BatchNorm
    statistics) is updated after every step, and it is what is validated and kept.
    `faces` (the faces step's parameters, when the images are its crops) goes into the
    checkpoint. `blends_loader` (fakes="sbi": the validation reals and their self-blends) is
    scored every epoch too, as `sbi_loss` and `sbi_auc`; `params.monitored` names the
    history column that early stopping and the kept epoch follow.
    """
    device = device or distributed.device()
    model.to(device, memory_format=torch.channels_last)
    samples = getattr(val_loader.dataset, "samples", None)
    groups = np.array([s.video for s in samples]) if samples else None
    if params.caches_features:
        return fit_head(model, train_loader, val_loader, params, checkpoint, device, last,
                        groups, faces)
    return train_loop(model, model, train_loader, val_loader, params, checkpoint, device, last,
                      groups, faces, blends_loader)


def fit_head(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
             params: TrainParams, checkpoint: str | os.PathLike | None, device: torch.device,
             last: str | os.PathLike | None = None, groups: np.ndarray | None = None,
             faces: dict | None = None) -> FitResult:
    """A frozen backbone without augmentation computes the same features every epoch: compute
    them once and train the head on them. The feature loaders come from `make_loader` with
    the image loaders' batch size and seed, so they draw the same shuffles, and the results
    equal those of training on images (tested)."""
    features = [make_loader(backbone_features(model, loader, device, f"{name} features"),
                            params.batch_size, shuffle=name == "train", seed=params.seed)
                for name, loader in (("train", train_loader), ("val", val_loader))]
    return train_loop(model, model.fc, *features, params, checkpoint, device, last, groups,
                      faces)


def train_loop(model: nn.Module, net: nn.Module, train_loader: DataLoader,
               val_loader: DataLoader, params: TrainParams,
               checkpoint: str | os.PathLike | None, device: torch.device,
               last: str | os.PathLike | None = None, groups: np.ndarray | None = None,
               faces: dict | None = None, blends_loader: DataLoader | None = None
               ) -> FitResult:
    """The epochs of `fit`: `net` (the model, or its head) learns from `train_loader`; the
    whole `model` is what is checkpointed. `groups` (per validation image, in dataset order)
    adds video-level metrics when a group holds several images. The decision threshold is
    chosen on the validation set the monitored column comes from."""
    rank, size = distributed.world()
    optimization = Optimization.build(net, params)
    validated = optimization.validated(net)
    # Under torchrun, DDP averages the gradients of the ranks' shares of each global batch.
    stepped = net if size == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    average = optimization.average
    update_average = None if average is None else (lambda: average.update_parameters(net))
    stopper = EarlyStopping(params.patience, params.min_delta)
    result, best_state, first = FitResult(), None, 1
    if params.resume:
        first, best_state = restore(last, checkpoint, model, optimization, stopper, result,
                                    params, train_loader)
    log = tqdm.write if rank == 0 else (lambda message: None)
    try:
        for epoch in range(first, params.max_epochs + 1):
            if stopper.should_stop:  # a resumed run that had already stopped early
                break
            lr = optimization.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, alike on all ranks
            train = train_one_epoch(stepped, train_loader, optimization.optimizer, device,
                                    params.trainable, desc=f"epoch {epoch}/{params.max_epochs}",
                                    mixup=params.mixup, label_smoothing=params.label_smoothing,
                                    after_step=update_average)
            if size > 1:  # every rank's share of the epoch, summed
                n, loss, acc = distributed.gather_arrays(
                    np.array([train["n"]]), np.array([train["loss"] * train["n"]]),
                    np.array([train["acc"] * train["n"]]))
                train.update(n=int(n.sum()), loss=loss.sum() / n.sum(), acc=acc.sum() / n.sum())
            val = evaluate(validated, val_loader, device)
            blends = (None if blends_loader is None else
                      evaluate(validated, blends_loader, device, desc="val self-blends"))
            if optimization.scheduler is not None:
                optimization.scheduler.step()
            watched = blends if params.monitored.startswith("sbi_") else val
            threshold = choose_threshold(params.threshold, watched.labels, watched.scores)
            metrics = binary_metrics(val.labels, val.scores, threshold)
            if grouped(groups):
                metrics["video"] = video_metrics(groups[val.indices], val.labels, val.scores,
                                                 threshold)
            if blends is not None:
                metrics["sbi"] = {**binary_metrics(blends.labels, blends.scores, threshold),
                                  "loss": blends.loss}
            row = {
                "epoch": epoch,
                "train_loss": train["loss"],
                "train_acc": train["acc"],
                "val_loss": val.loss,
                "val_acc": metrics["accuracy"],
                "val_auc": metrics["auc"],
                **({"val_video_auc": metrics["video"]["auc"]} if "video" in metrics else {}),
                **({"sbi_loss": blends.loss, "sbi_auc": metrics["sbi"]["auc"]}
                   if blends is not None else {}),
                "lr": lr,
                "seconds": time.perf_counter() - start,
                "images_per_s": train["n"] / train["seconds"] if train["seconds"] else math.nan,
            }
            result.history.append(row)
            watch = row[params.monitored]
            improved = stopper.step(watch if params.monitored.endswith("_loss") else -watch)
            sbi_text = (f"  self-blends loss {row['sbi_loss']:.4f} auc {row['sbi_auc']:.4f}"
                        if blends is not None else "")
            log(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc "
                f"{row['train_acc']:.3f}  val loss {val.loss:.4f} acc {row['val_acc']:.3f} "
                f"auc {row['val_auc']:.4f}{sbi_text}  {row['seconds']:.1f}s"
                f"{'  *best' if improved else ''}")
            if improved:
                best_state = kept_state(model, net, validated)
                result.best_epoch, result.threshold, result.best_eval = epoch, threshold, val
                result.metrics = {**metrics, "val_loss": val.loss, "best_epoch": epoch,
                                  "threshold_rule": params.threshold,
                                  "monitor": params.monitored}
                if checkpoint is not None and rank == 0:
                    save_checkpoint(checkpoint, best_state, params=params.to_dict(),
                                    threshold=threshold, threshold_rule=params.threshold,
                                    metrics=result.metrics, epoch=epoch, faces=faces)
            if last is not None and rank == 0:
                save_last(last, epoch, model, optimization, stopper, result, params)
            if distributed.broadcast_flag(stopper.should_stop):
                log(f"early stop: no better {params.monitored} for {stopper.bad_epochs} "
                    f"epochs; keeping epoch {result.best_epoch}")
                break
    except KeyboardInterrupt:
        result.interrupted = True
        log(f"interrupted: keeping the best epoch so far ({result.best_epoch or 'none'}); "
            "resume=True continues from the last completed epoch")
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


# The training state at an epoch boundary: everything the next epoch depends on.
STATE_FORMAT = "dfutils.training-state"


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


def save_last(path: str | os.PathLike, epoch: int, model: nn.Module,
              optimization: Optimization, stopper: EarlyStopping, result: FitResult,
              params: TrainParams) -> None:
    """The state after `epoch`: weights, optimizer, schedule, average, early stopping, the
    history so far and the random number generators; atomic."""
    best = result.best_eval
    state = {
        "format": STATE_FORMAT, "epoch": epoch, "params": params.to_dict(),
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimization": optimization.state_dict(),
        "stopper": {"best": stopper.best, "bad_epochs": stopper.bad_epochs},
        "history": jsonable(result.history), "best_epoch": result.best_epoch,
        "threshold": result.threshold, "metrics": jsonable(result.metrics),
        "best_eval": None if best is None else {
            "loss": best.loss, "labels": torch.from_numpy(best.labels.astype(np.int64)),
            "scores": torch.from_numpy(np.asarray(best.scores, dtype=np.float64)),
            "indices": torch.from_numpy(best.indices.astype(np.int64))},
        "rng": _rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def restore(last: str | os.PathLike | None, checkpoint: str | os.PathLike | None,
            model: nn.Module, optimization: Optimization, stopper: EarlyStopping,
            result: FitResult, params: TrainParams, train_loader: DataLoader
            ) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Put everything back as it was after the last completed epoch; return the next epoch
    and the best weights so far.

    DataLoader workers keep their random state between epochs, and it cannot be copied out
    of them; so the data loading (not the training) of the completed epochs is replayed,
    which leaves every worker where it was. The main process's generators are then set
    back. The resumed history is the one an uninterrupted run has (tested on the CPU).
    """
    path = Path(last) if last is not None else None
    if path is None or not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} not found (the run finished, or was "
                              "stopped before its first epoch ended); train without resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise CheckpointError(f"cannot resume from {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"cannot resume from {path}: it is not a training state")
    changed = sorted(k for k, v in params.to_dict().items()
                     if k != "resume" and state["params"].get(k) != v)
    if changed:
        raise ValueError(f"cannot resume {path.parent}: it was trained with other values of "
                         f"{', '.join(changed)}; resume with the parameters it recorded")
    model.load_state_dict(state["model_state"])
    optimization.load_state_dict(state["optimization"])
    stopper.best, stopper.bad_epochs = state["stopper"]["best"], state["stopper"]["bad_epochs"]
    result.history, result.best_epoch = state["history"], state["best_epoch"]
    result.threshold, result.metrics = state["threshold"], state["metrics"]
    best = state["best_eval"]
    if best is not None:
        result.best_eval = Evaluation(best["loss"], best["labels"].numpy(),
                                      best["scores"].numpy(), best["indices"].numpy())
    best_state = (load_checkpoint(checkpoint).model.state_dict()
                  if checkpoint is not None and result.best_epoch else None)
    if train_loader.num_workers > 0:
        for epoch in tqdm(range(1, state["epoch"] + 1), desc="replaying data loading",
                          unit="epoch", leave=False):
            train_loader.sampler.set_epoch(epoch)
            for _ in train_loader:
                pass
    _set_rng_state(state["rng"])
    tqdm.write(f"resuming {path.parent} after epoch {state['epoch']}")
    return state["epoch"] + 1, best_state


def save_outputs(run_dir: str | os.PathLike, result: FitResult, val_samples: list,
                 data_dir: str | os.PathLike) -> dict:
    """history.csv, metrics.json, val_predictions.csv and the figures; returns the figures."""
    from dfutils import viz

    if not result.history or result.best_eval is None:
        raise RuntimeError("training stopped before the first epoch finished; nothing to save")
    out, data_dir = resolve(run_dir), resolve(data_dir)
    write_csv(out / HISTORY, result.history)
    write_json(out / METRICS, {**result.metrics, "interrupted": result.interrupted,
                               "epochs_run": len(result.history)})
    best, m = result.best_eval, result.metrics
    write_csv(out / PREDICTIONS,
              [{"path": val_samples[i].path.relative_to(data_dir).as_posix(),
                "label": int(label), "p_fake": float(score), "group": val_samples[i].group,
                "video": val_samples[i].video}
               for i, label, score in zip(best.indices, best.labels, best.scores, strict=True)])
    groups = [val_samples[i].video for i in best.indices]
    figures = dict(zip(FIGURES, (
        viz.plot_history(result.history, result.best_epoch),
        viz.plot_roc(best.labels, best.scores, groups=groups),
        viz.plot_confusion(m["confusion"], m["threshold"]),
        viz.plot_score_hist(best.labels, best.scores, m["threshold"])), strict=True))
    for name, fig in figures.items():
        viz.save_figure(fig, out / name)
    return figures


def train_run(params: TrainParams) -> tuple[FitResult, dict]:
    """The 02-train step, for the notebook and the `train` command alike (one process or a
    torchrun rank): the result and its figures.

    Only rank 0 writes: model.pt, last.pt while the run can be resumed, history, metrics,
    predictions and figures.
    """
    from dfutils import runs, sbi, viz
    from dfutils.data import train_val_loaders, val_loader
    from dfutils.model import build_model
    from dfutils.split import read_report

    runs.seed_everything(params.seed)
    rank, _ = distributed.world()
    out = resolve(params.run_dir)
    if params.resume and not (out / LAST).is_file():
        raise CheckpointError(f"nothing to resume: {out / LAST} not found (the run finished, "
                              "or was stopped before its first epoch ended); train without resume")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # of a killed earlier run
    blends_loader, found = None, None
    if params.fakes == "sbi":
        train_loader, blends_loader, found = sbi.loaders(params)
        loader = val_loader(params)
        if rank == 0:
            tqdm.write(sbi.describe(found))
    else:
        train_loader, loader = train_val_loaders(params)
    # Resuming loads every weight from last.pt: pretrained weights are not needed again.
    model = build_model(None if params.resume else params.weights, params.trainable)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        tqdm.write(f"weights: {params.weights}; trainable: {params.trainable} ({n_trained:,} of "
                   f"{sum(p.numel() for p in model.parameters()):,} parameters); "
                   f"device: {distributed.device()}; outputs: {out}")
    faces = (read_report(resolve(params.data_dir)) or {}).get("faces")
    result = fit(model, train_loader, loader, params, checkpoint=out / CHECKPOINT_FILE,
                 device=distributed.device(), last=out / LAST, faces=faces,
                 blends_loader=blends_loader)
    if found is not None:
        result.metrics["self_blend_faces"] = found
    figures = {}
    if rank == 0:
        figures = save_outputs(out, result, loader.dataset.samples, params.data_dir)
        if blends_loader is not None:
            figures[SELF_BLENDS] = sbi.plot_examples(blends_loader.dataset)
            viz.save_figure(figures[SELF_BLENDS], out / SELF_BLENDS)
        if not result.interrupted:
            (out / LAST).unlink(missing_ok=True)  # finished: nothing left to resume
    return result, figures
