"""Export (`python -m dfutils export`): a trained run as a folder to hand to a colleague, a
moderation pipeline or a model hub (`dfutils.detector` reads it back).

The folder holds the weights alone as safetensors, `config.json` (the architecture, input
size and normalisation, the face crop's settings, the decision threshold and the video
rule: what scoring a file the way the run did needs, and the SHA-256 of every file), a
model card `README.md` written from the run's records, and with `onnx` a `model.onnx`
checked against PyTorch on the run's validation images. Reading it back never unpickles
anything: JSON, safetensors and an ONNX graph. predict, evaluate and the benchmark take it
as `model_dir` (`--model`), through PyTorch or, with `onnx`, ONNX Runtime.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import safetensors.torch
import torch

from dfutils import paths
from dfutils.atomic import atomic_path, jsonable, write_json, write_text
from dfutils.datasets import TERMS
from dfutils.detector import (
    DETECTOR_FORMAT,
    DETECTOR_VERSION,
    ONNX_INPUT,
    ONNX_OUTPUT,
    DetectorError,
    OnnxNetwork,
    sha256,
)
from dfutils.metrics import shown
from dfutils.model import Checkpoint, load_checkpoint, threshold_text
from dfutils.params import ExportParams, TrainParams
from dfutils.paths import resolve
from dfutils.runs import now, read_run
from dfutils.scoring import images_for, score

# The largest difference in P(fake) between ONNX Runtime and PyTorch that export accepts
# (float32 on both sides differs by about 1e-6).
ONNX_TOLERANCE = 1e-4
# How a clip's P(fake) comes from its frames when the run was trained on face crops:
# predict's rule, said in the config so another program can score clips the same way.
VIDEO_RULE = "mean P(fake) over the face crops of the frames sampled (frames_per_video)"


# -- Writing one ---------------------------------------------------------------------------

def _portable(params: TrainParams) -> dict[str, Any]:
    """The training parameters as config.json keeps them: a path becomes its last part (the
    folder's name), so no path of the exporting machine travels with the model."""
    path_fields = {f.name for f in dataclasses.fields(params) if f.metadata.get("path")}
    return {k: Path(v).name if k in path_fields and isinstance(v, str) and v else v
            for k, v in params.to_dict().items()}


def config_of(checkpoint: Checkpoint, metrics: dict, files: dict[str, str],
              onnx: dict | None) -> dict:
    """config.json: everything needed to score a file the way the run did, and the kept
    epoch's validation `metrics` (metrics.json: with their intervals)."""
    entry = checkpoint.arch
    return jsonable({
        "format": DETECTOR_FORMAT, "version": DETECTOR_VERSION,
        "arch": entry.name, "image_size": checkpoint.image_size,
        "normalisation": {"mean": list(entry.mean), "std": list(entry.std)},
        "input": "RGB, resized to image_size x image_size, scaled to [0, 1], then normalised; "
                 f"NCHW float32 named '{ONNX_INPUT}'",
        "output": f"'{ONNX_OUTPUT}': one logit per image, the log-odds of fake "
                  "(P(fake) = sigmoid)",
        "threshold": checkpoint.threshold, "threshold_rule": checkpoint.threshold_rule,
        "faces": checkpoint.faces,
        "video_rule": VIDEO_RULE if checkpoint.faces is not None else None,
        "epoch": checkpoint.epoch, "metrics": metrics,
        "params": _portable(checkpoint.params),
        # the split it trained on (folder and manifest hash): where that split is, evaluate
        # and the benchmark refuse to score its training images as a test set
        "split": checkpoint.split,
        "files": files, "onnx": onnx, "exported": now()})


def validation_files(run_dir: Path, checkpoint: Checkpoint, limit: int) -> list[Path]:
    """Up to `limit` of the run's validation images (val_predictions.csv, below the split it
    trained on), the first ones that are still there."""
    listed = run_dir / paths.PREDICTIONS
    data_dir = resolve(checkpoint.params.data_dir)
    if not listed.is_file():
        return []
    with open(listed, newline="") as f:
        names = [row["path"] for row in csv.DictReader(f)]
    found = [data_dir / n for n in names if (data_dir / n).is_file()
             and (data_dir / n).resolve().is_relative_to(data_dir.resolve())]
    return found[:limit]


def export_onnx(checkpoint: Checkpoint, target: Path) -> None:
    """The network as ONNX with a dynamic batch (torch.export), float32."""
    size = checkpoint.image_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(checkpoint.model.eval().float(), (example,), dynamo=True,
                                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(target))


def check_onnx(checkpoint: Checkpoint, onnx_path: Path, files: list[Path],
               batch_size: int) -> float:
    """The largest difference in P(fake) between ONNX Runtime and PyTorch on `files`."""
    ours = score(checkpoint, images_for(checkpoint, files), batch_size=batch_size,
                 device=torch.device("cpu"), desc="PyTorch")
    theirs = score(dataclasses.replace(checkpoint, model=OnnxNetwork(onnx_path)),
                   images_for(checkpoint, files), batch_size=batch_size,
                   device=torch.device("cpu"), desc="ONNX Runtime")
    both = ours.ok & theirs.ok
    if not both.any():
        raise DetectorError(f"none of the run's {len(files)} validation images could be read "
                            "to check model.onnx: export without --onnx, or where the split is")
    return float(np.abs(ours.p_fake[both] - theirs.p_fake[both]).max())


def check_out(out: Path, run_dir: Path) -> None:
    """--out must be a new or empty folder outside the run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds files: name a new or empty folder "
                         "(export never writes over anything)")
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the run folder: name a new folder")


def export_run(params: ExportParams, log: Callable[[str], None] = lambda line: None) -> dict:
    """The `export` command: check --out, read the run, write the folder beside --out and
    move it into place whole (an interrupted export leaves nothing at --out); config.json's
    contents are returned."""
    run_dir, out = resolve(params.run_dir), resolve(params.out)
    check_out(out, run_dir)
    checkpoint = load_checkpoint(run_dir / paths.MODEL)
    checks = validation_files(run_dir, checkpoint, params.n_check) if params.onnx else []
    if params.onnx and not checks:
        raise ValueError(f"--onnx checks model.onnx on the run's validation images, and none "
                         f"of those {run_dir / paths.PREDICTIONS} lists is under "
                         f"{resolve(checkpoint.params.data_dir)}: export where the split is, "
                         "or without --onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)  # of an earlier export of ours, killed
    building.mkdir()
    try:
        weights = building / paths.DETECTOR_WEIGHTS
        with atomic_path(weights) as tmp:  # (and readable as every file the tool writes)
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in checkpoint.model.state_dict().items()}, tmp,
                metadata={"format": DETECTOR_FORMAT, "arch": checkpoint.arch.name})
        files, onnx = {paths.DETECTOR_WEIGHTS: sha256(weights)}, None
        if params.onnx:
            target = building / paths.DETECTOR_ONNX
            log(f"exporting {paths.DETECTOR_ONNX} (torch.export, dynamic batch) ...")
            export_onnx(checkpoint, target)
            difference = check_onnx(checkpoint, target, checks, params.batch_size)
            log(f"ONNX Runtime against PyTorch on {len(checks)} validation images: largest "
                f"difference in P(fake) {difference:.2e} (bound {ONNX_TOLERANCE:g})")
            if difference > ONNX_TOLERANCE:
                raise ValueError(f"{paths.DETECTOR_ONNX} differs from PyTorch by {difference:.2e}"
                                 f" in P(fake) (more than {ONNX_TOLERANCE:g}) on the run's "
                                 "validation images: nothing was exported; export without "
                                 "--onnx")
            files[paths.DETECTOR_ONNX] = sha256(target)
            onnx = {"opset": _opset(target), "n_checked": len(checks),
                    "max_difference": difference, "tolerance": ONNX_TOLERANCE}
        config = config_of(checkpoint, read_record(run_dir, paths.METRICS) or checkpoint.metrics,
                           files, onnx)
        write_json(building / paths.DETECTOR_CONFIG, config)
        write_text(building / paths.DETECTOR_CARD, card(
            run_dir, config, read_run(run_dir), read_record(run_dir, paths.BENCHMARK_JSON)))
        if out.is_dir():
            out.rmdir()  # empty (checked): the finished folder takes its place
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return config


def _opset(path: Path) -> int:
    """The ONNX operator set a graph was written for."""
    graph = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def read_record(run_dir: Path, name: str) -> dict | None:
    """A JSON record of the run (metrics.json, benchmark.json), or None."""
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


# -- The model card ------------------------------------------------------------------------

def card(run_dir: Path, config: dict, record: dict, benchmark: dict | None) -> str:
    """README.md of an exported folder: every number in it is read from the run's records
    (its checkpoint's metrics, run.json, benchmark.json), none typed in."""
    p, m = config["params"], config["metrics"]
    ci = m.get("ci") or {}
    faces = config["faces"]
    dataset = (faces or {}).get("dataset", "folder") if faces else "folder"
    lines = [
        f"# {run_dir.name}: a deepfake detector ({config['arch']})", "",
        "Tells real faces from fake ones: one logit per image, the log-odds of *fake*; "
        f"{threshold_text(config['threshold'], config['threshold_rule'])}.", "",
        "## Use it", "", "```bash",
        "python -m dfutils predict --model <this folder> photo.jpg "
        + ("clip.mp4 " if faces else "") + "--out scores.csv",
        *(["python -m dfutils predict --model <this folder> --onnx photo.jpg   # ONNX Runtime"]
          if config["onnx"] else []),
        "```", "",
        f"Input: {config['input']}; size {config['image_size']} px, mean "
        f"{config['normalisation']['mean']}, std {config['normalisation']['std']}.",
        ("Faces are found and cropped first, as the training images were (config.json "
         f"`faces`); a clip's P(fake) is the {config['video_rule']}." if faces else
         "Trained on whole images, not face crops: score images as they are."), "",
        "## Training", "",
        f"- data: {_data_line(dataset, config)}",
        f"- recipe: {config['arch']}, weights {p.get('weights')}, trainable "
        f"{p.get('trainable')}, image size {p.get('image_size')}, fakes {p.get('fakes')}, "
        f"optimizer {p.get('optimizer')} (lr {p.get('lr')}, weight decay "
        f"{p.get('weight_decay')}, schedule {p.get('schedule')}), batch {p.get('batch_size')}, "
        f"seed {p.get('seed')}; kept epoch {config['epoch']} of at most "
        f"{p.get('max_epochs')} (early stopping on {m.get('monitor', 'val_loss')})",
        *([f"- trainable parameters: {m['parameters']['trainable']:,} of "
           f"{m['parameters']['total']:,}"] if m.get("parameters") else []),
        f"- code: dfutils at git commit {(record.get('git') or {}).get('commit', 'unknown')}; "
        "every parameter is in config.json `params`", "",
        "## Validation", "",
        "On the run's validation split (it chose the kept epoch, so these are not held-out "
        "numbers), 95% bootstrap intervals in brackets:", "",
        "| level | AUC | AP | EER | accuracy |", "|---|---|---|---|---|",
        _metrics_row("frame", m, ci),
        *([_metrics_row("video", m["video"], m["video"].get("ci") or {})]
          if isinstance(m.get("video"), dict) else []),
        *([_metrics_row("self-blends", m["sbi"], m["sbi"].get("ci") or {})]
          if isinstance(m.get("sbi"), dict) else []), ""]
    lines += _benchmark_lines(benchmark)
    lines += _cam_lines(record, benchmark)
    lines += ["## Limitations", "",
              "- A detector learns the fakes it was trained on: expect lower AUCs on other "
              "generators, other compression and other data sets"
              + ("" if benchmark else " (this run was not scored on any test set other than "
                 "its validation split)") + ".",
              *(["- Trained from random initialisation (weights None), not from published "
                 "weights."] if p.get("weights") in (None, "None") else []),
              f"- Images are resized to {config['image_size']} px; faces smaller than that are "
              "upsampled.",
              "- P(fake) is a score, not proof: the threshold trades missed fakes for false "
              "alarms (see the EER above).", "",
              "## Licence of the training data", "",
              _terms_line(dataset), "",
              f"Exported {config['exported']} by `python -m dfutils export`; config.json holds "
              "the SHA-256 of every file.", ""]
    return "\n".join(lines)


def _data_line(dataset: str, config: dict) -> str:
    split = config.get("split") or {}
    what = (f"faces cropped from {dataset}" if config["faces"] else "a folder of real and "
            "fake images")
    return what + (f" (the split's manifest SHA-256 {split['manifest_sha256'][:12]}...)"
                   if split.get("manifest_sha256") else "")


def _metrics_row(level: str, metrics: dict, ci: dict) -> str:
    return f"| {level} | " + " | ".join(shown(metrics.get(k), ci.get(k)) for k in (
        "auc", "ap", "eer", "accuracy")) + " |"


def _benchmark_lines(benchmark: dict | None) -> list[str]:
    if not benchmark:
        return []
    rows = [r for r in benchmark["rows"] if r["rule"] in ("frame", "mean")]
    return ["## Other data sets (05-benchmark)", "",
            "Each test set's official test split; frame: every face crop, video: the mean "
            "P(fake) of a clip's crops; 95% intervals in brackets.", "",
            "| test set | method | level | AUC | AP | EER | videos |",
            "|---|---|---|---|---|---|---|",
            *(f"| {r['test_set']} | {r['method']} | {r['level']} | " + " | ".join(
                shown(r[k], [r[f"{k}_low"], r[f"{k}_high"]]) for k in ("auc", "ap", "eer"))
              + f" | {r['n_videos']} |" for r in rows), ""]


def _cam_lines(record: dict, benchmark: dict | None) -> list[str]:
    """The Grad-CAM checks: 03-gradcam's on the validation split, the benchmark's on the
    test sets' masks, each with its verdict."""
    summary, lines = record.get("summary") or {}, []

    def of(name: str) -> str:
        return shown(summary[name], summary.get(f"{name}_ci"))

    if summary.get("pointing_cam") is not None:
        lines.append(f"- validation ({summary.get('cam_layer')}): pointing game "
                     f"{of('pointing_cam')} vs random maps {of('pointing_random')}; deletion "
                     f"AUC {of('deletion_auc_cam')} vs random {of('deletion_auc_random')} "
                     "(lower is better)")
    for row in (benchmark or {}).get("explanations") or []:
        lines.append(f"- {row['test_set']} {row['method']} ({row['layer']}, {row['n_crops']} "
                     f"crops, {row['masks']}): pointing game {row['pointing_cam']:.3f} vs "
                     f"random {row['pointing_random']:.3f}, {row['pointing_verdict']}")
    if not lines:
        return []
    return ["## Where Grad-CAM points", "", *lines, ""]


def _terms_line(dataset: str) -> str:
    if dataset in TERMS:
        return (f"Trained on {TERMS[dataset]}. A model trained on it may carry those terms: "
                "read them before sharing it.")
    return ("The run recorded no licence terms for its training data (a folder of the user's "
            "own images or clips): add the terms of those images here before sharing.")
