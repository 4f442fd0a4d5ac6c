"""Training: `train_one_epoch`, `evaluate` and `fit` with early stopping on validation loss."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dfutils import distributed
from dfutils.data import make_loader
from dfutils.metrics import binary_metrics, choose_threshold
from dfutils.model import save_checkpoint, train_mode
from dfutils.params import TrainParams
from dfutils.paths import remove_stale_temps, resolve, write_csv, write_json


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; images (4-D) in channels-last layout, which ResNet runs faster in
    (measured here on the CPU: 43 against 33 images/s for a bare forward at 224 px)."""
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, name: str = "adam"
                   ) -> torch.optim.Optimizer:
    """Over trainable parameters: Adam (the seed's), AdamW when weight decay is asked for, or
    SGD with Nesterov momentum 0.9 (the usual from-scratch choice)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if weight_decay > 0:
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(trainable, lr=lr)


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


def cached_loaders(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                   params: TrainParams, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Loaders over backbone features that give the head the batches the image loaders would.

    They are made by `make_loader` with the same batch size and seed as the image loaders
    (the notebook's), so they draw the same shuffles.
    """
    train = make_loader(backbone_features(model, train_loader, device, "train features"),
                        params.batch_size, shuffle=True, seed=params.seed)
    val = make_loader(backbone_features(model, val_loader, device, "val features"),
                      params.batch_size, shuffle=False, seed=params.seed)
    return train, val


def kept_state(model: nn.Module, net: nn.Module, scorer: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `model`'s weights in which those of `net` (the model, or its head when
    features are cached) come from `scorer`: `net` itself or its moving average."""
    state = model.state_dict()
    if scorer is not net:
        prefix = next(name for name, module in model.named_modules() if module is net)
        state.update({f"{prefix}.{k}" if prefix else k: v
                      for k, v in scorer.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, params: TrainParams,
        checkpoint: str | os.PathLike | None = None, device: torch.device | None = None
        ) -> FitResult:
    """Train until validation loss stops improving; keep (and save) the best epoch's weights.

    Each new best is written to `checkpoint` at once, with its threshold and metrics, so
    Ctrl-C (or a crash) at any point leaves the best model so far on disk. On return the
    model holds the best weights. Under torchrun, only rank 0 writes, validation metrics
    cover the whole split, and rank 0's early-stopping decision holds for all ranks.
    With `params.ema` an exponential moving average of the weights (and BatchNorm
    statistics) is updated after every step, and it is what is validated and kept.
    """
    device = device or default_device()
    model.to(device, memory_format=torch.channels_last)
    # A frozen backbone without augmentation computes the same features every epoch:
    # compute them once and train the head on them (the results equal the uncached path).
    net, trainable = model, params.trainable
    if params.caches_features:
        train_loader, val_loader = cached_loaders(model, train_loader, val_loader, params,
                                                  device)
        net, trainable = model.fc, "all"
    optimizer = make_optimizer(model, params.lr, params.weight_decay, params.optimizer)
    rank, size = distributed.world()
    # Under torchrun, DDP averages the gradients of the ranks' shares of each global batch.
    trained = net if size == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    averaged = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(params.ema),
                              use_buffers=True) if params.ema > 0 else None)
    scorer = net if averaged is None else averaged.module  # the weights validated and kept
    update_average = None if averaged is None else (lambda: averaged.update_parameters(net))
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.max_epochs)
                 if params.schedule == "cosine" else None)
    stopper = EarlyStopping(params.patience, params.min_delta)
    result, best_state = FitResult(), None
    log = tqdm.write if rank == 0 else (lambda message: None)
    try:
        for epoch in range(1, params.max_epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, alike on all ranks
            train = train_one_epoch(trained, train_loader, optimizer, device, trainable,
                                    desc=f"epoch {epoch}/{params.max_epochs}",
                                    mixup=params.mixup, label_smoothing=params.label_smoothing,
                                    after_step=update_average)
            if size > 1:  # every rank's share of the epoch, summed
                n, loss, acc = distributed.gather_arrays(
                    np.array([train["n"]]), np.array([train["loss"] * train["n"]]),
                    np.array([train["acc"] * train["n"]]))
                train.update(n=int(n.sum()), loss=loss.sum() / n.sum(), acc=acc.sum() / n.sum())
            val = evaluate(scorer, val_loader, device)
            if scheduler is not None:
                scheduler.step()
            threshold = choose_threshold(params.threshold, val.labels, val.scores)
            metrics = binary_metrics(val.labels, val.scores, threshold)
            row = {
                "epoch": epoch,
                "train_loss": train["loss"],
                "train_acc": train["acc"],
                "val_loss": val.loss,
                "val_acc": metrics["accuracy"],
                "val_auc": metrics["auc"],
                "lr": lr,
                "seconds": time.perf_counter() - start,
                "images_per_s": train["n"] / train["seconds"] if train["seconds"] else math.nan,
            }
            result.history.append(row)
            improved = stopper.step(val.loss)
            log(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc "
                f"{row['train_acc']:.3f}  val loss {val.loss:.4f} acc {row['val_acc']:.3f} "
                f"auc {row['val_auc']:.4f}  {row['seconds']:.1f}s{'  *best' if improved else ''}")
            if improved:
                best_state = kept_state(model, net, scorer)
                result.best_epoch, result.threshold, result.best_eval = epoch, threshold, val
                result.metrics = {**metrics, "val_loss": val.loss, "best_epoch": epoch,
                                  "threshold_rule": params.threshold}
                if checkpoint is not None and rank == 0:
                    save_checkpoint(checkpoint, best_state, params=params.to_dict(),
                                    threshold=threshold, threshold_rule=params.threshold,
                                    metrics=result.metrics, epoch=epoch)
            if distributed.broadcast_flag(stopper.should_stop):
                log(f"early stop: no better validation loss for {stopper.bad_epochs} epochs; "
                    f"keeping epoch {result.best_epoch}")
                break
    except KeyboardInterrupt:
        result.interrupted = True
        log(f"interrupted: keeping the best epoch so far ({result.best_epoch or 'none'})")
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def save_outputs(run_dir: str | os.PathLike, result: FitResult, val_samples: list,
                 data_dir: str | os.PathLike) -> dict:
    """history.csv, metrics.json, val_predictions.csv and the figures; returns the figures."""
    from dfutils import viz

    if not result.history or result.best_eval is None:
        raise RuntimeError("training stopped before the first epoch finished; nothing to save")
    out, data_dir = resolve(run_dir), resolve(data_dir)
    write_csv(out / "history.csv", result.history)
    write_json(out / "metrics.json", {**result.metrics, "interrupted": result.interrupted,
                                       "epochs_run": len(result.history)})
    best, m = result.best_eval, result.metrics
    write_csv(out / "val_predictions.csv",
              [{"path": val_samples[i].path.relative_to(data_dir).as_posix(),
                "label": int(label), "p_fake": float(score)}
               for i, label, score in zip(best.indices, best.labels, best.scores, strict=True)])
    figures = {
        "curves.png": viz.plot_history(result.history, result.best_epoch),
        "roc.png": viz.plot_roc(best.labels, best.scores),
        "confusion.png": viz.plot_confusion(m["confusion"], m["threshold"]),
        "scores.png": viz.plot_score_hist(best.labels, best.scores, m["threshold"]),
    }
    for name, fig in figures.items():
        viz.save_figure(fig, out / name)
    return figures


def train_run(params: TrainParams) -> FitResult:
    """The 02-train notebook as a function (the `train` command): one process or a torchrun rank.

    Only rank 0 writes: model.pt, history, metrics, predictions, figures and run.json.
    """
    from dfutils import runs
    from dfutils.data import train_val_loaders
    from dfutils.model import build_model

    runs.seed_everything(params.seed)
    rank, size = distributed.world()
    out = resolve(params.run_dir)
    started = runs.now()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # of a killed earlier run
        if not (out / "run.json").is_file():
            runs.start_run(out, out.name, None)
    train_loader, val_loader = train_val_loaders(params)
    model = build_model(params.weights, params.trainable)
    result = fit(model, train_loader, val_loader, params, checkpoint=out / "model.pt",
                 device=distributed.device())
    if rank == 0:
        save_outputs(out, result, val_loader.dataset.samples, params.data_dir)
        runs.record_step(out, "02-train", params=params.to_dict(), started=started,
                         finished=runs.now(), world_size=size,
                         status="interrupted" if result.interrupted else "done",
                         metrics=result.metrics, command="python -m dfutils train")
    return result
