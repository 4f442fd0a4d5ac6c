"""The model: a registry network (dfutils.archs) with one logit, the log-odds of fake; its
weights, trainable depth, the one forward pass, and the one checkpoint format.

A checkpoint holds weights and everything that made them: the architecture, the training
parameters, the decision threshold, metrics, the faces step's parameters when the images
were face crops, and, in a run's last.pt, the training state to resume from. model.pt and
last.pt are the same format, read by `read_checkpoint`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from dfutils import archs
from dfutils.atomic import atomic_path
from dfutils.params import Amp, ParameterError, TrainParams
from dfutils.paths import resolve
from dfutils.runs import why_no_model

CHECKPOINT_FORMAT = "dfutils.checkpoint"
CHECKPOINT_VERSION = 1


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


class CheckpointError(ValueError):
    """A file is not a readable dfutils checkpoint."""


def published_file(arch: str) -> Path:
    """Where an architecture's published weights are looked for: torch.hub's checkpoints
    folder (torchvision keeps and looks for its downloads there too), by the file's
    published name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / archs.get(arch).published.file


def _published(arch: str, kind: str) -> dict[str, torch.Tensor]:
    """An architecture's published weights (`weights` = their kind): torchvision's through
    its cache (downloading if it can); a timm entry's from the file the user downloaded,
    never from the network."""
    published = archs.get(arch).published
    if kind != published.kind:
        raise WeightsUnavailable(
            f"weights={kind!r}: {arch} is published with {published.what}: use "
            f"weights={published.kind!r}, a state-dict file, or weights=None")
    cached = published_file(arch)
    if published.torchvision is None:
        if not cached.is_file():
            raise WeightsUnavailable(
                f"{arch} weights={kind!r} needs {published.what}: {cached} not found. "
                f"Download {published.url} to that folder (torch.hub.get_dir()/checkpoints; "
                "set TORCH_HOME to move it) or pass the file as weights='<path>'; "
                "weights=None trains from random initialisation")
        return read_weights(cached)
    try:
        return published.torchvision.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; bad hashes a RuntimeError
        raise WeightsUnavailable(
            f"{arch} ImageNet weights are not available: {cached} is missing and could not "
            f"be downloaded from {published.url} ({error}). Copy that file to {cached} "
            f"(the folder is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
            "pass weights='<path to a state dict>', or train from random initialisation "
            "with weights=None."
        ) from error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a state dict: safetensors, a PyTorch state dict (read with
    weights_only=True, so no code in it runs), a dfutils checkpoint (its weights), or
    OpenAI's CLIP file, a TorchScript archive (read by torch.jit.load, which runs no Python
    code of the file's)."""
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file {path} not found: pass weights='imagenet' (or 'clip'), an existing "
            "state-dict file, or weights=None for random initialisation")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        if zipfile.is_zipfile(path) and any(
                name.endswith("/constants.pkl") for name in zipfile.ZipFile(path).namelist()):
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            safetensors.SafetensorError) as error:
        raise WeightsUnavailable(f"cannot read weights file {path}: "
                                 f"{str(error).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["model_state"]
    if not isinstance(state, dict) or not state:
        raise WeightsUnavailable(f"{path} holds no state dict (a mapping of tensor names to "
                                 "tensors)")
    return state


def build_model(arch: str, weights: str | os.PathLike | None, trainable: str,
                image_size: int | None = None) -> nn.Module:
    """The network of `arch` with a one-logit head, for inputs of `image_size` (default: the
    size its published weights were made for; a transformer's position embeddings depend
    on it); `weights` is the kind of its published weights ("imagenet", "clip"), a file,
    or None.

    A state dict with another head loads everything but the head, which is always new; a
    file with a one-logit head loads whole. Nothing falls back to random weights silently.
    The network knows its architecture (`archs.of`).
    """
    entry = archs.get(arch)
    state = None
    if weights is not None:
        state = (_published(arch, weights) if weights in archs.PRETRAINED
                 else read_weights(resolve(weights)))
    try:
        model = entry.new(image_size, state)
    except ValueError as error:
        raise WeightsUnavailable(f"weights {str(weights)!r} do not fit {arch}: {error}"
                                 ) from None
    set_trainable(model, trainable)
    return model


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """How many parameters train, and how many the network has."""
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


def set_trainable(model: nn.Module, trainable: str) -> None:
    """Freeze every parameter outside the trainable part (also those a network holds
    outside its modules: a transformer's class token and position embeddings)."""
    keep = archs.of(model).trained(model, trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(keep is None or name.startswith(tuple(f"{k}." for k in keep)))


def train_mode(model: nn.Module, trainable: str) -> None:
    """model.train(), except frozen parts stay in eval() so BatchNorm statistics do not drift."""
    model.train()
    for module in archs.of(model).frozen(model, trainable):
        module.eval()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; images (4-D) in channels-last layout, which CNNs run faster in
    (docs/performance.md has the measurement)."""
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in eval mode on `device`, in channels-last layout. Call it outside
    torch.inference_mode: weights converted inside it become inference tensors, which
    Grad-CAM (it needs a graph) can no longer use."""
    return model.eval().to(device, memory_format=torch.channels_last)


def precision(amp: Amp, device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs in for an `amp` value on a device; None: float32 throughout.

    "auto" is bfloat16 on a GPU that has it (the range of float32: no loss scaling), float16
    on an older GPU, and float32 on the CPU, so that a CPU's results stay those of float32
    (on a CPU with AMX, bf16 is several times faster: docs/performance.md)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@contextlib.contextmanager
def autocast(amp: Amp, device: torch.device) -> Iterator[None]:
    """Mixed precision for the forward passes inside, as `amp` says (nothing when it is off)."""
    dtype = precision(amp, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def grad_scaler(amp: Amp, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 training (small gradients would underflow to zero); a
    scaler that does nothing otherwise. Its state goes into last.pt, so a resume is exact."""
    return torch.amp.GradScaler(device.type, enabled=precision(amp, device) == torch.float16)


def forward(model: nn.Module, images: torch.Tensor, device: torch.device | None = None,
            amp: Amp = "off") -> tuple[torch.Tensor, torch.Tensor]:
    """The one forward pass of training, validation, predict, evaluate and Grad-CAM: a batch
    (moved to `device` first, when given) to its logits, shape (N,), and P(fake), in float32
    whatever `amp` the network ran in. Grad-CAM keeps amp off: its maps are differences of
    gradients, which float16 and bfloat16 round away."""
    if device is not None:
        images = to_device(images, device)
    with autocast(amp, images.device):
        logits = model(images).reshape(-1).float()
    return logits, torch.sigmoid(logits)


def save_checkpoint(path: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor], *,
                    params: dict[str, Any], threshold: float, threshold_rule: str,
                    metrics: dict[str, Any], epoch: int, faces: dict | None = None,
                    training: dict[str, Any] | None = None, split: dict | None = None) -> None:
    """Weights (of a model, or its state dict) at `epoch`, the parameters that made them,
    the decision threshold and metrics of the kept epoch, the faces step's parameters when
    the training images were face crops (so that predict crops new inputs the same way),
    the split it trained on (`split.identity`), and `training`, the state to resume from
    (last.pt); atomic."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": archs.of(model).name if isinstance(model, nn.Module) else params["arch"],
        "model_state": {k: v.detach().cpu().clone() for k, v in state.items()},
        "params": params,
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "metrics": metrics,
        "epoch": int(epoch),
        "faces": faces,
        "split": split,
        "training": training,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path: str | os.PathLike, resume: bool = False) -> dict[str, Any]:
    """A checkpoint file's contents, read with weights_only=True; anything that is not a
    complete dfutils checkpoint is refused. `resume`: the file must hold a training state
    (a run's last.pt). Only this module reads its keys."""
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: {path} not found (the run finished, or was stopped before its "
            "first epoch ended); train without resume" if resume else
            f"checkpoint {path} not found: {why_no_model(path.parent)}")
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
    try:  # a checkpoint older than the registry holds the one network there was
        archs.get(str(checkpoint.get("arch", archs.DEFAULT)))
    except archs.UnknownArch as error:
        raise CheckpointError(f"{path}: {error}") from None
    if resume and not isinstance(checkpoint.get("training"), dict):
        raise CheckpointError(f"cannot resume from {path}: it holds no training state")
    return checkpoint


@dataclass
class Checkpoint:
    """A trained run's kept model, on the CPU in eval mode, and what made it."""

    model: nn.Module
    params: TrainParams  # the training parameters (defaults for any an older file lacks)
    threshold: float  # decision threshold on P(fake)
    threshold_rule: str  # how it was chosen: "0.5" or "eer"
    epoch: int
    metrics: dict[str, Any]
    path: Path
    faces: dict | None = None  # the faces step's parameters, when trained on its crops
    split: dict | None = None  # the split it trained on (split.identity)

    @property
    def image_size(self) -> int:
        return self.params.image_size

    @property
    def arch(self) -> archs.Arch:
        return archs.get(self.params.arch)


def threshold_text(threshold: float, rule: str) -> str:
    """The decision rule in words: `threshold: P(fake) >= 0.5000 (fixed 0.5)`."""
    how = {"0.5": "fixed 0.5", "eer": "EER point of the validation split"}.get(rule, rule)
    return f"threshold: P(fake) >= {threshold:.4f} ({how})"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path` (a model.pt), its model built and loaded."""
    path = resolve(path)
    raw = read_checkpoint(path)
    arch = archs.get(str(raw.get("arch", archs.DEFAULT))).name
    try:
        params = TrainParams.from_mapping({**raw["params"], "arch": arch})
    except ParameterError as error:
        raise CheckpointError(
            f"{path} holds training parameters this dfutils does not accept ({error}); "
            "re-save it with dfutils.model.save_checkpoint, giving TrainParams(...).to_dict()"
        ) from None
    model = build_model(arch, None, params.trainable, params.image_size)
    try:
        model.load_state_dict(raw["model_state"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[1:2] or str(error).splitlines()[:1]
        raise CheckpointError(
            f"the weights in {path} do not fit {arch} with one logit "
            f"({' '.join(first).strip()[:200]}): it is not a checkpoint of this project's model"
        ) from None
    model.eval()
    return Checkpoint(model, params, float(raw["threshold"]), str(raw["threshold_rule"]),
                      int(raw.get("epoch", 0)), dict(raw.get("metrics") or {}), path,
                      raw.get("faces"), raw.get("split"))
