"""ResNet18 with one logit (the log-odds of fake): weights, trainable depth, checkpoints."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from dfutils.params import ParameterError, Trainable, TrainParams
from dfutils.paths import atomic_path, resolve

# The top-level children each `trainable` value trains (None: all of them).
TRAINABLE: dict[str, tuple[str, ...] | None] = {"fc": ("fc",), "layer4": ("layer4", "fc"),
                                               "all": None}

CHECKPOINT_FILE = "model.pt"  # a run's best checkpoint: runs/<run>/model.pt
CHECKPOINT_FORMAT = "dfutils.checkpoint"
CHECKPOINT_VERSION = 1


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


class CheckpointError(ValueError):
    """A file is not a readable dfutils checkpoint."""


def imagenet_cache_file() -> Path:
    """Where torchvision keeps (and looks for) ResNet18's ImageNet weights."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ResNet18's ImageNet weights through torchvision's cache (downloading if it can)."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; bad hashes a RuntimeError
        cached = imagenet_cache_file()
        raise WeightsUnavailable(
            f"ResNet18 ImageNet weights are not available: {cached} is missing and could not "
            f"be downloaded from {weights.url} ({error}). Copy that file to {cached} "
            f"(the folder is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
            "pass weights='<path to a state dict>', or train from random initialisation "
            "with weights=None."
        ) from error


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file {path} not found: pass weights='imagenet', an existing state-dict "
            "file, or weights=None for random initialisation"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise WeightsUnavailable(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["model_state"]
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise WeightsUnavailable(f"{path} is not a ResNet18 state dict (no 'conv1.weight')")
    return state


def build_model(weights: str | os.PathLike | None = None, trainable: Trainable = "fc"
                ) -> nn.Module:
    """ResNet18 whose `fc` gives one logit; `weights` is "imagenet", a file, or None.

    A backbone state dict with ImageNet's 1000-way head loads everything but the head,
    which is always new; a file with a one-logit head loads whole. Nothing falls back to
    random weights silently.
    """
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 1)
    if weights is not None:
        state = imagenet_state_dict() if weights == "imagenet" else _load_state_file(
            resolve(weights))
        head = state.get("fc.weight")
        if head is None or getattr(head, "shape", None) != model.fc.weight.shape:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights {weights!r} do not fit ResNet18: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    set_trainable(model, trainable)
    return model


def frozen_modules(model: nn.Module, trainable: str) -> list[nn.Module]:
    """The top-level children that `trainable` keeps frozen."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    keep = TRAINABLE[trainable]
    return [m for name, m in model.named_children() if keep is not None and name not in keep]


def set_trainable(model: nn.Module, trainable: str) -> None:
    """Freeze every parameter outside the trainable part."""
    for p in model.parameters():
        p.requires_grad_(True)
    for module in frozen_modules(model, trainable):
        for p in module.parameters():
            p.requires_grad_(False)


def train_mode(model: nn.Module, trainable: str) -> None:
    """model.train(), except frozen parts stay in eval() so BatchNorm statistics do not drift."""
    model.train()
    for module in frozen_modules(model, trainable):
        module.eval()


def save_checkpoint(path: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor], *,
                    params: dict[str, Any], threshold: float, threshold_rule: str,
                    metrics: dict[str, Any], epoch: int, faces: dict | None = None) -> None:
    """Weights (of a model, or its state dict), the parameters that made them, the decision
    threshold and metrics, and the faces step's parameters when the training images were
    face crops (so that predict crops new inputs the same way); atomic."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": "resnet18-1logit",
        "model_state": {k: v.detach().cpu() for k, v in state.items()},
        "params": params,
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "metrics": metrics,
        "epoch": int(epoch),
        "faces": faces,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's raw contents, read with weights_only=True; anything that is not a
    complete dfutils checkpoint is refused. Only this module reads its keys."""
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train a model first (02-train)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable dfutils checkpoint (corrupt, truncated, or a pickle "
            f"that is not plain weights): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a dfutils checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
            "to start from a plain state dict pass it as weights= to build_model"
        )
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {checkpoint.get('version')}, "
                              f"this dfutils reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("model_state", "params", "threshold", "threshold_rule")
               if k not in checkpoint]
    if missing or not isinstance(checkpoint["params"], dict) or (
            "image_size" not in checkpoint["params"]):
        raise CheckpointError(
            f"{path} lacks {', '.join(missing) or 'params.image_size'}: it was not written by "
            "02-train's save_checkpoint; train again (02-train) or re-save it with "
            "dfutils.model.save_checkpoint, giving the training parameters")
    return checkpoint


@dataclass
class Checkpoint:
    """A trained run's best model, on the CPU in eval mode, and what made it."""

    model: nn.Module
    params: TrainParams  # the training parameters (defaults for any an older file lacks)
    threshold: float  # decision threshold on P(fake)
    threshold_rule: str  # how it was chosen: "0.5" or "eer"
    epoch: int
    metrics: dict[str, Any]
    path: Path
    faces: dict | None = None  # the faces step's parameters, when trained on its crops

    @property
    def image_size(self) -> int:
        return self.params.image_size


def threshold_text(threshold: float, rule: str) -> str:
    """The decision rule in words: `threshold: P(fake) >= 0.5000 (fixed 0.5)`."""
    how = {"0.5": "fixed 0.5", "eer": "EER point of the validation split"}.get(rule, rule)
    return f"threshold: P(fake) >= {threshold:.4f} ({how})"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path` (a model.pt), its model built and loaded."""
    path = resolve(path)
    raw = read_checkpoint(path)
    try:
        params = TrainParams.from_mapping(raw["params"])
    except ParameterError as error:
        raise CheckpointError(
            f"{path} holds training parameters this dfutils does not accept ({error}); "
            "re-save it with dfutils.model.save_checkpoint, giving TrainParams(...).to_dict()"
        ) from None
    model = build_model(weights=None, trainable=params.trainable)
    try:
        model.load_state_dict(raw["model_state"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[1:2] or str(error).splitlines()[:1]
        raise CheckpointError(
            f"the weights in {path} do not fit ResNet18 with one logit "
            f"({' '.join(first).strip()[:200]}): it is not a checkpoint of this project's model"
        ) from None
    model.eval()
    return Checkpoint(model, params, float(raw["threshold"]), str(raw["threshold_rule"]),
                      int(raw.get("epoch", 0)), dict(raw.get("metrics") or {}), path,
                      raw.get("faces"))
