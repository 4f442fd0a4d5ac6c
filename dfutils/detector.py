"""An exported detector folder (written by `dfutils.export`) read back: the one loader of
predict, evaluate and the benchmark for `--run` and `--model` alike.

Reading a folder never unpickles anything: config.json, the weights as safetensors, and
with `onnx` the graph model.onnx run by ONNX Runtime. Every file is checked against the
SHA-256 config.json records before it is read, so a changed, replaced or missing file is
one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime
import safetensors
import safetensors.torch
import torch
from torch import nn

from dfutils import archs, paths
from dfutils.model import Checkpoint, build_model, load_checkpoint
from dfutils.params import ParameterError, TrainParams
from dfutils.paths import from_here, resolve

DETECTOR_FORMAT = "dfutils.detector"
DETECTOR_VERSION = 1
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"


class DetectorError(ValueError):
    """An exported folder that cannot be used as it is: one line naming the file and the fix."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxNetwork(nn.Module):
    """model.onnx run by ONNX Runtime on the CPU, in the place of the network: a batch of
    images to its logits, so `scoring.score` takes either. It has no gradients: Grad-CAM
    needs the PyTorch weights."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().float().cpu().contiguous().numpy()
        logits = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})[0]
        return torch.from_numpy(np.ascontiguousarray(logits)).to(images.device)


def read_config(folder: Path) -> dict:
    """config.json of an exported folder, checked to be one of ours."""
    path = folder / paths.DETECTOR_CONFIG
    shown = from_here(path)
    if not path.is_file():
        raise DetectorError(f"{shown} not found: --model takes a folder written by `python -m "
                            "dfutils export` (or pass the run with --run)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DetectorError(f"{shown} is not valid JSON ({error}): export the run again"
                            ) from None
    if not isinstance(config, dict) or config.get("format") != DETECTOR_FORMAT:
        raise DetectorError(f"{shown} is not a dfutils detector's config (no "
                            f"'{DETECTOR_FORMAT}' format): export the run again")
    if config.get("version") != DETECTOR_VERSION:
        raise DetectorError(f"{shown} has version {config.get('version')}, this dfutils reads "
                            f"version {DETECTOR_VERSION}")
    missing = [k for k in ("arch", "params", "threshold", "threshold_rule", "files")
               if k not in config]
    if missing:
        raise DetectorError(f"{shown} lacks {', '.join(missing)}: export the run again")
    return config


def checked_file(folder: Path, config: dict, name: str) -> Path:
    """A file of the folder whose SHA-256 is the one config.json records (a changed file
    is refused by name, before it is read)."""
    path, recorded = folder / name, (config.get("files") or {}).get(name)
    shown = from_here(path)
    if recorded is None:
        raise DetectorError(f"{from_here(folder / paths.DETECTOR_CONFIG)} records no {name}" + (
            ": export the run again with --onnx" if name == paths.DETECTOR_ONNX else
            ": export the run again"))
    if not path.is_file():
        raise DetectorError(f"{shown} not found: the folder is incomplete; export the run again")
    if sha256(path) != recorded:
        raise DetectorError(f"{shown} is not the file exported with {paths.DETECTOR_CONFIG} "
                            "(its SHA-256 differs): it was changed or replaced; export the "
                            "run again")
    return path


def load_detector(folder: str | os.PathLike, onnx: bool = False) -> Checkpoint:
    """An exported folder as the run's checkpoint would be: its network (PyTorch from
    model.safetensors, or with `onnx` ONNX Runtime on model.onnx), the training parameters,
    threshold, metrics and face crop settings config.json records."""
    folder = resolve(folder)
    where = from_here(folder)
    if not folder.is_dir():
        raise DetectorError(f"--model {where} is not a folder: give the folder `python -m "
                            "dfutils export` wrote")
    config = read_config(folder)
    try:
        arch = archs.get(str(config["arch"])).name
        params = TrainParams.from_record({**config["params"], "arch": arch})
    except (archs.UnknownArch, ParameterError, TypeError) as error:
        raise DetectorError(f"{from_here(folder / paths.DETECTOR_CONFIG)}: {error}") from None
    weights = checked_file(folder, config, paths.DETECTOR_WEIGHTS)
    if onnx:
        path = checked_file(folder, config, paths.DETECTOR_ONNX)
        try:
            network: nn.Module = OnnxNetwork(path)
        except Exception as error:  # onnxruntime raises its own (Fail, InvalidGraph, ...)
            raise DetectorError(f"{from_here(path)} cannot be loaded by ONNX Runtime: "
                                f"{str(error).splitlines()[0][:200]}") from None
        size = network.session.get_inputs()[0].shape[2:]
        if list(size) != [params.image_size] * 2:
            raise DetectorError(f"{from_here(path)} takes {size} images, "
                                f"{paths.DETECTOR_CONFIG} says {params.image_size}: export "
                                "the run again")
    else:
        try:
            with safetensors.safe_open(weights, "pt") as f:
                meta = f.metadata() or {}
            state = safetensors.torch.load_file(weights)
        except (safetensors.SafetensorError, OSError) as error:
            raise DetectorError(f"{from_here(weights)} is not a readable safetensors file "
                                f"({error})") from None
        if meta.get("arch") != arch:
            raise DetectorError(f"{from_here(weights)} holds {meta.get('arch') or 'another'} "
                                f"weights, {paths.DETECTOR_CONFIG} says {arch}: export the run "
                                "again")
        network = build_model(arch, None, params.trainable, params.image_size)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            first = (str(error).splitlines()[1:2] or str(error).splitlines()[:1])[0].strip()
            raise DetectorError(f"the weights in {from_here(weights)} do not fit {arch} with one "
                                f"logit ({first[:200]}): export the run again") from None
    network.eval()
    return Checkpoint(network, params, float(config["threshold"]),
                      str(config["threshold_rule"]), int(config.get("epoch", 0)),
                      dict(config.get("metrics") or {}), weights, config.get("faces"),
                      config.get("split"))


def model_file(run_dir: str | os.PathLike, model_dir: str | os.PathLike = "") -> Path:
    """The file that holds the weights scored: the run's model.pt, or an exported folder's
    model.safetensors."""
    if model_dir:
        return resolve(model_dir) / paths.DETECTOR_WEIGHTS
    return resolve(run_dir) / paths.MODEL


def load_model(run_dir: str | os.PathLike, model_dir: str | os.PathLike = "",
               onnx: bool = False) -> Checkpoint:
    """What predict, evaluate and the benchmark score with: the run's model.pt, or an
    exported folder (through ONNX Runtime with `onnx`)."""
    if model_dir:
        return load_detector(model_dir, onnx)
    if onnx:  # (the parameter classes refuse it first: check_onnx)
        raise DetectorError("onnx scores an exported detector's model.onnx: give model_dir")
    return load_checkpoint(resolve(run_dir) / paths.MODEL)
