"""Evaluate a trained run (04-evaluate, `python -m dfutils evaluate`): on a labelled folder
of images, of photos and clips cropped as the run's training images were, or on a split's
val or test images (or their self-blends), with robustness sweeps (JPEG, blur,
downscaling) and calibration.

The images are scored by `scoring.score` and assessed by `metrics.assess`, as the
benchmark's are; a task of a cluster job scores its share into a part (`shards.Part`) and
`merge_evaluation` writes the report from all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dfutils import faces, paths, sbi, shards, viz
from dfutils.atomic import atomic_path, write_json
from dfutils.corruptions import PERTURBATIONS, SWEEPS, Perturb
from dfutils.datasets import IMAGE_SUFFIXES, LABELS, scan_classes
from dfutils.detector import load_model, model_file
from dfutils.manifest import (
    LabelledSet,
    Sample,
    check_identity,
    check_unseen,
    dataset_of,
    labelled_set,
    read_manifest,
)
from dfutils.metrics import (
    NAMES,
    TITLES,
    assess,
    binary_metrics,
    calibration_bins,
    expected_calibration_error,
    metrics_line,
    shown,
    subgroups,
)
from dfutils.model import Checkpoint, threshold_text
from dfutils.owned import fingerprint
from dfutils.params import EvalParams, FacesParams
from dfutils.paths import from_here, is_plain_name, resolve
from dfutils.progress import tqdm
from dfutils.scoring import images_for, score


def report_name(params: EvalParams) -> str:
    """The name of an evaluation report: as given, or the folder's (and the split's, and
    "self-blends" when the split's fakes are its reals' self-blends)."""
    folder = resolve(params.eval_dir).name
    blends = "-self-blends" if params.self_blends else ""
    return params.name or (f"{folder}-{params.split}{blends}" if params.split else folder)


def labelled_folder(data_dir: str | os.PathLike) -> LabelledSet:
    """The images under DIR/real and DIR/fake (fake = 1), a subfolder below a class folder
    being one clip's frames, and the files skipped by type."""
    root = resolve(data_dir)
    found, skipped = scan_classes(root, IMAGE_SUFFIXES, "images", need_each=True)
    return LabelledSet([Sample(root / rel, LABELS[label],
                               video=rel.parent.as_posix() if len(rel.parts) > 2
                               else str(root / rel), source=rel.as_posix())
                        for rel, label in found], skipped)


def _faces_params(checkpoint: Checkpoint, data_dir: str | os.PathLike, out: Path):
    """The faces step's parameters for a labelled folder: the run's, into `out`."""
    return dataclasses.replace(FacesParams.from_record(checkpoint.faces), overwrite=True,
                               raw_dir=str(resolve(data_dir)), faces_dir=str(out),
                               dataset="folder", methods="")  # a labelled folder


def face_crops(checkpoint: Checkpoint, data_dir: str | os.PathLike, out: Path,
               shard: shards.Shard | None = None) -> LabelledSet:
    """Crop the faces of a labelled folder of photos and clips into `out` the way the run's
    training images were made (with a `shard`, only its sources, into its part): the crops,
    each of its source's video, and what was skipped or unreadable; each crop's key is
    its path in `out`."""
    report = faces.extract_faces(_faces_params(checkpoint, data_dir, out), shard=shard)
    if "shard" in report:  # this task's part
        folder, table = Path(report["folder"]), {r["path"]: r for r in report["rows"]}
    else:
        folder = out
        table = {path: row for path, row in faces.read_faces(out).items()
                 if shard is None or shard.owns(row["source"])}
    return LabelledSet([Sample(folder / path, LABELS[row["label"]], video=row["source"],
                               source=row["source"], key=path)
                        for path, row in table.items()],
                       [{"path": e["source"], "reason": e["reason"]}
                        for e in report["skipped"] + report["unreadable"]])


def self_blend_inputs(data_dir: Path, split: str, out: Path,
                      shard: shards.Shard | None = None) -> LabelledSet:
    """The reals of a split that have a face, and one self-blend of each written to `out`
    as PNG: the blends training with fakes="sbi" validates on (`sbi.ValidationBlends`,
    the same in every run on the split), so any run can be scored on them. The blends of
    a clip's frames make a video of their own; a blend's source is its real's. With a
    `shard`, those it owns (and only their blends are written)."""
    blends, counts = sbi.validation_blends(data_dir, split=split)
    reals = blends.samples
    if not reals:
        raise ValueError(f"none of the {counts['reals']} {split} reals of {data_dir} has a "
                         "face to self-blend: self-blends need the faces step's crops")
    kept = {r.path for r in reals}
    skipped = [{"path": s.path.relative_to(data_dir).as_posix(),
                "reason": "no face landmarks: no self-blend"}
               for s in read_manifest(data_dir, split) if s.label == 0 and s.path not in kept]
    made = [out / f"{r.path.relative_to(data_dir).as_posix()}.png" for r in reals]
    for i, target in enumerate(tqdm(made, desc="self-blends", unit="image")):
        if shard is None or shard.owns(str(target)):
            with atomic_path(target) as tmp:
                Image.fromarray(blends.rgb(len(reals) + i)).save(tmp, format="PNG")
    images = LabelledSet([Sample(r.path, 0, video=r.video, source=r.source) for r in reals]
                         + [Sample(path, 1, video=f"self-blend:{r.video}", source=r.source)
                            for r, path in zip(reals, made, strict=True)], skipped)
    return images.subset(lambda s: shard is None or shard.owns(s.name))


def labelled_inputs(params: EvalParams, checkpoint: Checkpoint, out: Path,
                    shard: shards.Shard | None = None) -> LabelledSet:
    """The images of eval_dir: a split's val or test rows (`params.split`; with
    `params.self_blends`, its reals and their self-blends), the crops of a folder of photos
    and clips made as the run's training images were, or the images of a labelled folder (a
    subfolder below a class folder is one clip's frames); with a `shard`, those it owns."""
    root = resolve(params.eval_dir)
    if params.split:
        images = labelled_set(root, params.split)  # ValueError when it has none
        if params.self_blends:
            return self_blend_inputs(root, params.split, out / paths.EVAL_BLENDS, shard)
    elif checkpoint.faces is not None and params.faces:
        return face_crops(checkpoint, root, out / paths.EVAL_FACES, shard)
    else:
        images = labelled_folder(root)
    return images.subset(lambda s: shard is None or shard.owns(s.name))


def score_sweeps(checkpoint: Checkpoint, images: LabelledSet, params: EvalParams,
                 sweeps: dict[str, Sequence]) -> tuple[np.ndarray, list[str], dict]:
    """P(fake) of every image as it is, each image's error ("" when read), and P(fake) at
    each level of each perturbation ({kind: {level: scores}}; in memory)."""
    def scores(perturb: Perturb | None, desc: str):
        return score(checkpoint, images_for(checkpoint, images.samples, perturb),
                     batch_size=params.batch_size, num_workers=params.num_workers,
                     amp=params.amp, desc=desc)

    clean = scores(None, "clean")
    swept = {kind: {level: clean.p_fake if (kind, level) in (("blur", 0), ("downscale", 1))
                    else scores(PERTURBATIONS[kind](level), f"{kind} {level}").p_fake
                    for level in levels} for kind, levels in sweeps.items()}
    return clean.p_fake, clean.errors, swept


def evaluate_folder(params: EvalParams, sweeps: dict[str, Sequence] = SWEEPS,
                    shard: shards.Shard | None = None) -> tuple[dict, dict]:
    """Metrics at the run's threshold, robustness sweeps and calibration on a labelled folder
    or on a split's val or test images.

    Writes runs/<run>/eval/<name>/report.json and figures; returns the report and figures.
    The source images are only read: every perturbation happens in memory. When the run was
    trained on face crops (and `params.faces`), a folder's photos and clips are cropped the
    same way first (into the report's folder, faces/), and the report adds video-level
    metrics; so it does for a folder of images in one subfolder per clip, and for a split
    whose images belong to clips.

    With a `shard`, only the images it owns are scored (every perturbation too) into a part,
    <report folder>/parts/<i>-of-<n>/, and ({}, {}) is returned; `merge_evaluation` writes
    the report from every part, computed over all the scores as one run would.
    """
    run_dir, name = resolve(params.run_dir), report_name(params)
    eval_dir = resolve(params.eval_dir).resolve()
    if eval_dir == run_dir.resolve() or run_dir.resolve() in eval_dir.parents:
        raise ValueError(f"the data to evaluate, {eval_dir}, is inside the run folder {run_dir}: "
                         "give a folder with real/ and fake/ (or a split made by 01-split) "
                         "outside the run")
    if not is_plain_name(name):
        raise ValueError(f"report name {name!r} must be a plain name (letters, digits, '.', "
                         "'_' or '-'): it becomes a folder under <run>/eval/; give name=")
    checkpoint = load_model(run_dir, params.model_dir, params.onnx)
    if params.split:
        check_identity(checkpoint.split, params.eval_dir, checkpoint.path,
                       f"evaluate on its {params.split} split")
    if params.split == "test":
        check_unseen(checkpoint.split, params.eval_dir, "test", checkpoint.path,
                     "evaluate on its test split")
    out = paths.eval_folder(run_dir, name)
    part = None
    if shard is not None:
        part = shards.Part(out / paths.EVAL_PARTS, shard, {
            "params": params.to_dict() | {"sweeps": {k: list(v) for k, v in sweeps.items()}},
            "inputs": {"model": _model_print(params)}})
        part.check("give another --name")
    images = labelled_inputs(params, checkpoint, out, shard)
    clean, errors, swept = score_sweeps(checkpoint, images, params, sweeps)
    if part is None:
        return _evaluation(params, checkpoint, images, clean, errors, swept, name, out)
    part.start(resume=False)
    with part.writing() as add:
        for i, sample in enumerate(images.samples):
            add(sample.name, {"error": errors[i], "clean": float(clean[i]),
                              "swept": {kind: [float(levels[level][i]) for level in
                                               sweeps[kind]] for kind, levels in swept.items()}})
    part.finish(len(images))
    return {}, {}


def _model_print(params: EvalParams) -> str:
    """The identity of the weights an evaluation scores with (the run's, or an exported
    folder's)."""
    weights = model_file(params.run_dir, params.model_dir)
    return fingerprint(weights.parent, [weights.name])


def merge_evaluation(run_dir: str | os.PathLike, name: str) -> tuple[dict, dict]:
    """The report of a sharded evaluate (<run>/eval/<name>/) from every part: the faces
    merged first when the tasks cropped them, then the metrics, intervals and figures over
    all the scores, as one run computes them; the parts go once the report is written."""
    run_dir = resolve(run_dir)
    if not is_plain_name(name):
        raise ValueError(f"--name {name!r} must be a plain name (letters, digits, '.', '_' or "
                         "'-'): the folder under <run>/eval/ that the tasks wrote")
    out = paths.eval_folder(run_dir, name)
    parts = shards.complete_parts(out / paths.EVAL_PARTS, "--shard ")
    recorded = dict(parts[0].header["params"])
    sweeps = recorded.pop("sweeps")
    params = EvalParams.from_mapping(recorded)
    if parts[0].header["inputs"]["model"] != _model_print(params):
        raise ValueError(f"{model_file(run_dir, params.model_dir)} changed since the tasks "
                         "scored with it: run every task again")
    checkpoint = load_model(run_dir, params.model_dir, params.onnx)
    if checkpoint.faces is not None and params.faces and not params.split:
        faces.merge_faces(_faces_params(checkpoint, params.eval_dir, out / paths.EVAL_FACES))
    images = labelled_inputs(params, checkpoint, out)
    lines = {key: line for part in parts for key, line in part.done().items()}
    keys = [s.name for s in images.samples]
    if sorted(lines) != sorted(keys):
        raise ValueError(f"the parts in {out / paths.EVAL_PARTS} do not cover the "
                         f"{len(keys)} images of {params.eval_dir} once each: run every "
                         "task again")

    def gathered(get: Callable[[dict], float]) -> np.ndarray:
        return np.array([get(lines[key]) for key in keys], dtype=float)

    clean = gathered(lambda line: line["clean"])
    errors = [lines[key]["error"] for key in keys]
    swept = {kind: {level: gathered(lambda line, k=kind, j=j: line["swept"][k][j])
                    for j, level in enumerate(levels)} for kind, levels in sweeps.items()}
    result = _evaluation(params, checkpoint, images, clean, errors, swept, name, out)
    for part in parts:
        part.remove()
    return result


def by_subgroup(images: LabelledSet, scores: np.ndarray, threshold: float, n_resamples: int,
                names: np.ndarray, reals: str) -> dict[str, dict]:
    """`metrics.assess` of each subgroup (`metrics.subgroups`: per source folder, its fakes
    against its reals; per method, its fakes against every real), or why not ({"n", "why"})
    when it holds one class only."""
    labels, videos, found = images.labels, images.videos, {}
    for name, at in subgroups(labels, names, reals).items():
        missing = [label for label, value in LABELS.items() if not (labels[at] == value).any()]
        found[name] = ({"n": int(at.sum()), "why": f"no {missing[0]} image from {name}"}
                       if missing else
                       assess(labels[at], scores[at], videos[at], threshold, n_resamples))
    return found


def by_source(images: LabelledSet, scores: np.ndarray, threshold: float, params: EvalParams
              ) -> dict:
    """The report's `by_source`: each source folder's fakes against its reals (the data sets
    of a combined split); for a split of a published data set, whose first folders each
    hold one class, its methods (each one's fakes against every real, as the benchmark's
    rows); with neither, `by_source_note` says so."""
    dataset = dataset_of(params.eval_dir) if params.split else "folder"
    methods, folders = images.column("method"), images.column("folder")
    if dataset != "folder":
        if set(methods[images.labels == 1].tolist()) - {""}:
            return {"by_source": by_subgroup(images, scores, threshold, params.n_bootstrap,
                                             methods, "all"),
                    "by_source_note": f"a split of {dataset}: its sources are its methods, "
                                      "each one's fakes against every real"}
        return {"by_source": {}, "by_source_note": f"a split of {dataset}, one source: the "
                                                   "metrics above are its"}
    if not set(folders.tolist()) - {""}:
        return {"by_source": {}, "by_source_note": "no source folders (every image lies "
                                                   "directly in real/ or fake/): the metrics "
                                                   "above are the one source's"}
    return {"by_source": by_subgroup(images, scores, threshold, params.n_bootstrap, folders,
                                     "own")}


def _evaluation(params: EvalParams, checkpoint: Checkpoint, images: LabelledSet,
                clean: np.ndarray, errors: list[str], swept: dict, name: str, out: Path
                ) -> tuple[dict, dict]:
    """The report and figures from the scores of every image (`score_sweeps`), written."""
    ok = np.array([not e for e in errors], dtype=bool)  # typed: no crop at all is possible
    labels, threshold = images.labels, checkpoint.threshold
    for label, value in LABELS.items():
        if not (ok & (labels == value)).any():
            why = next((f" (first: {s.path}: {e})" for s, e in zip(images.samples, errors,
                                                                 strict=True)
                        if e and s.label == value), "")
            raise ValueError(f"no {label} image of {resolve(params.eval_dir)} could be read"
                             f"{why}: AUC, AP and EER need both classes")
    scored, scores = images.subset(ok), clean[ok]
    videos = scored.videos
    metrics = assess(scored.labels, scores, videos, threshold, params.n_bootstrap)
    sweep_metrics = {kind: [{"level": level, **{k: m[k] for k in NAMES}}
                            for level, at_level in levels.items()
                            for m in [binary_metrics(scored.labels, at_level[ok], threshold)]]
                     for kind, levels in swept.items()}
    methods = scored.column("method")
    report = {
        "run": str(resolve(params.run_dir)), "model": str(checkpoint.path),
        "scored_by": "ONNX Runtime" if params.onnx else "PyTorch",
        "data": str(resolve(params.eval_dir)),
        "split": params.split, "self_blends": params.self_blends, "name": name,
        "threshold": threshold,
        "threshold_rule": checkpoint.threshold_rule,
        "n_images": int(ok.sum()),
        "unreadable": [{"path": str(s.path), "reason": e}
                       for s, e in zip(images.samples, errors, strict=True) if e],
        "skipped": images.skipped,
        "metrics": metrics,
        **(by_source(scored, scores, threshold, params) if params.by_source else {}),
        **({"by_method": by_subgroup(scored, scores, threshold, params.n_bootstrap, methods,
                                     "all")}
           if len(set(methods[scored.labels == 1].tolist()) - {""}) > 1 else {}),
        "calibration": {"ece": expected_calibration_error(scored.labels, scores, 15),
                        "bins": calibration_bins(scored.labels, scores, 15)},
        "sweeps": sweep_metrics,
    }
    figures = dict(zip(paths.EVAL_FIGURES, (
        viz.plot_roc(scored.labels, scores, title=f"ROC ({name})", groups=videos),
        viz.plot_confusion(metrics["confusion"], threshold),
        viz.plot_sweeps(report["sweeps"]),
        viz.plot_reliability(report["calibration"])), strict=True))
    for file, fig in figures.items():
        viz.save_figure(fig, out / file)
    write_json(out / paths.EVAL_REPORT, report)
    return report, figures


def subgroup_table(report: dict, key: str = "by_source") -> list[dict]:
    """The report's subgroups (`by_source` or `by_method`) as rows to show: per subgroup,
    its images' metrics and, when its images belong to clips, its videos' AUC, each with
    its 95% interval."""
    rows = []
    for name, found in report.get(key, {}).items():
        row = {key.removeprefix("by_"): name, "images": found["n"]}
        if "why" in found:
            rows.append(row | {"AUC": f"not scored: {found['why']}"})
            continue
        row |= {TITLES[k]: shown(found[k], found["ci"][k]) for k in NAMES}
        video = found.get("video")
        if video:
            row |= {"videos": video["n"], "video AUC": shown(video["auc"], video["ci"]["auc"])}
        rows.append(row)
    return rows


def report_lines(report: dict, run: Path) -> list[str]:
    """An evaluation report in words, each number with its 95% interval: what the command
    prints."""
    m = report["metrics"]
    lines = [threshold_text(report["threshold"], report["threshold_rule"]),
             f"{report['n_images']} images: {metrics_line(m)}  ECE "
             f"{report['calibration']['ece']:.4f}  ([low, high]: 95% bootstrap intervals)"]
    if "video" in m:
        lines.append(f"{m['video']['n']} videos (mean P(fake) of their frames): "
                     f"{metrics_line(m['video'])}")
    lines.append(f"confusion (rows: true real, fake; columns: predicted real, fake): "
                 f"{m['confusion']}")
    if report.get("by_source_note"):
        lines.append(f"by source: {report['by_source_note']}")
    for key in ("by_source", "by_method"):
        for row in subgroup_table(report, key):
            what = key.removeprefix("by_")
            lines.append(f"{what} {row.pop(what)}: " + "  ".join(f"{k} {v}"
                                                                 for k, v in row.items()))
    for kind, levels in report["sweeps"].items():
        lines.append(f"AUC under {kind:9s} " + "  ".join(f"{r['level']}: {r['auc']:.4f}"
                                                          for r in levels))
    lines += [f"cannot read {item['path']}: {item['reason']}" for item in report["unreadable"]]
    lines.append(f"report: {from_here(paths.eval_folder(run, report['name']))}/"
                 f"{paths.EVAL_REPORT}")
    return lines


def record(params: EvalParams) -> dict | None:
    """What run.json keeps of a finished 04-evaluate: the report's name, its metrics with
    their intervals, and its calibration error."""
    name = report_name(params)
    path = paths.eval_folder(resolve(params.run_dir), name) / paths.EVAL_REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    m = report["metrics"]
    return {"name": name, **{k: m[k] for k in NAMES}, "ci": m.get("ci"),
            "ece": report["calibration"]["ece"]}


def shown_lines(params: EvalParams, result: tuple[dict, dict]) -> list[str]:
    """What the evaluate command prints: the report in words; for a task of a cluster job,
    where its share went and how to merge."""
    run, name = resolve(params.run_dir), report_name(params)
    if not result[0]:
        return [f"scored into {from_here(paths.eval_folder(run, name) / paths.EVAL_PARTS)}; "
                f"`dfutils merge evaluate --run {from_here(run)} --name {name}` writes the "
                "report from every part"]
    return report_lines(result[0], run)
