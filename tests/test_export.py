"""Issue 39: a run exported as a folder to share (safetensors, config.json, a model card,
ONNX) scores as the run does through PyTorch and ONNX Runtime; a folder whose files were
changed is refused by name; training writes TensorBoard curves, one point per epoch per
curve, also after a resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from conftest import one_line_error
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dfutils import paths
from dfutils.curves import TAGS
from dfutils.detector import DetectorError, load_detector, sha256
from dfutils.export import card, export_run
from dfutils.metrics import shown
from dfutils.params import ExportParams, PredictParams, TrainParams
from dfutils.predict import predict_run
from dfutils.train import train_run

SETTINGS = {"weights": None, "trainable": "all", "image_size": 32, "batch_size": 8,
            "max_epochs": 3, "patience": 3, "lr": 3e-3, "num_workers": 0, "seed": 3}


def curves_of(run: Path) -> dict[str, list[int]]:
    """Each curve's steps, as TensorBoard's own reader gives them."""
    events = EventAccumulator(str(run / paths.TENSORBOARD), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for 3 epochs on an easy split, and its folder exported with ONNX."""
    from conftest import make_raw, make_split

    root = tmp_path_factory.mktemp("export")
    make_raw(root / "raw", 24, 24, separable=True)
    make_split(root / "raw", root / "data", seed=0)
    run = root / "run"
    train_run(TrainParams(data_dir=str(root / "data"), run_dir=str(run), **SETTINGS))
    config = export_run(ExportParams(run_dir=str(run), out=str(root / "detector"), onnx=True))
    return root, run, root / "detector", config


def scores(tmp_path: Path, data: Path, **model) -> dict[str, float]:
    out = tmp_path / f"{len(list(tmp_path.iterdir()))}.csv"
    rows = predict_run(PredictParams(paths=[str(data / "val")], out=str(out), num_workers=0,
                                     **model)).rows
    assert all(row["status"] == "ok" for row in rows)
    return {row["path"]: float(row["p_fake"]) for row in rows}


def test_an_exported_run_scores_as_the_run_through_pytorch_and_onnx(trained, tmp_path):
    root, run, detector, config = trained
    assert sorted(p.name for p in detector.iterdir()) == sorted(
        [paths.DETECTOR_WEIGHTS, paths.DETECTOR_CONFIG, paths.DETECTOR_CARD,
         paths.DETECTOR_ONNX])
    assert config["onnx"]["max_difference"] <= config["onnx"]["tolerance"]
    ours = scores(tmp_path, root / "data", run_dir=str(run))
    exported = scores(tmp_path, root / "data", model_dir=str(detector))
    onnx = scores(tmp_path, root / "data", model_dir=str(detector), onnx=True)
    assert ours.keys() == exported.keys() == onnx.keys() and len(ours) > 4
    assert max(abs(ours[k] - exported[k]) for k in ours) <= 1e-6  # the CSV's 6 decimals
    assert max(abs(ours[k] - onnx[k]) for k in ours) <= 1e-4
    # dynamic batch: one image, then a batch of another size, through ONNX Runtime
    loaded = load_detector(detector, onnx=True)
    import torch
    one, five = (loaded.model(torch.zeros(n, 3, 32, 32)) for n in (1, 5))
    assert one.shape[0] == 1 and five.shape[0] == 5


def test_evaluate_scores_an_exported_folder_as_the_run(trained, tmp_path):
    """The report goes to the run folder named (--run), the model comes from --model."""
    from conftest import evaluate

    root, run, detector, _ = trained
    settings = {"sweeps": {"blur": (0,)}, "split": "val", "num_workers": 0}
    ours, _ = evaluate(run, root / "data", "val", **settings)
    for onnx in (False, True):
        theirs, _ = evaluate(tmp_path / f"reports-{onnx}", root / "data", "val", **settings,
                             model_dir=str(detector), onnx=onnx)
        assert theirs["metrics"]["auc"] == pytest.approx(ours["metrics"]["auc"], abs=1e-6)
        assert theirs["scored_by"] == ("ONNX Runtime" if onnx else "PyTorch")
        assert (tmp_path / f"reports-{onnx}" / paths.EVAL / "val" / paths.EVAL_REPORT).is_file()


def test_the_config_and_the_card_hold_the_runs_records(trained):
    root, run, detector, config = trained
    metrics = json.loads((run / paths.METRICS).read_text())
    checkpoint = load_detector(detector)
    assert config["threshold"] == checkpoint.threshold == metrics["threshold"]
    assert config["arch"] == "resnet18" and config["image_size"] == 32
    assert config["params"]["data_dir"] == "data"  # a folder's name, no path of this machine
    text = (detector / paths.DETECTOR_CARD).read_text()
    row = "| frame | " + " | ".join(shown(metrics[k], metrics["ci"][k])
                                     for k in ("auc", "ap", "eer", "accuracy")) + " |"
    assert row in text
    assert f"kept epoch {metrics['best_epoch']}" in text and "weights None" in text
    assert "recorded no licence terms" in text  # a folder of the user's own images
    # the card is a function of the records: the same records give the same card
    assert card(run, json.loads((detector / paths.DETECTOR_CONFIG).read_text()),
                json.loads((run / paths.RUN_RECORD).read_text()) if (
                    run / paths.RUN_RECORD).is_file() else {}, None) == text


def tampered(detector: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(detector, copy)
    return copy


def rehash(folder: Path, name: str) -> None:
    config = json.loads((folder / paths.DETECTOR_CONFIG).read_text())
    config["files"][name] = sha256(folder / name)
    (folder / paths.DETECTOR_CONFIG).write_text(json.dumps(config))


def test_a_changed_or_mismatched_folder_is_refused_by_name(trained, tmp_path):
    _, _, detector, _ = trained
    # a weight file changed after export
    copy = tampered(detector, tmp_path / "a")
    with open(copy / paths.DETECTOR_WEIGHTS, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DetectorError, match=r"model\.safetensors is not the file exported"):
        load_detector(copy)
    # the graph too
    copy = tampered(detector, tmp_path / "b")
    (copy / paths.DETECTOR_ONNX).write_bytes(b"not a graph")
    with pytest.raises(DetectorError, match=r"model\.onnx is not the file exported"):
        load_detector(copy, onnx=True)
    # another architecture's config for these weights
    copy = tampered(detector, tmp_path / "c")
    config = json.loads((copy / paths.DETECTOR_CONFIG).read_text())
    config["arch"] = config["params"]["arch"] = "resnet50"
    (copy / paths.DETECTOR_CONFIG).write_text(json.dumps(config))
    with pytest.raises(DetectorError, match="holds resnet18 weights.*says resnet50"):
        load_detector(copy)
    # a key missing (and the hash made to match): the weights do not fit
    copy = tampered(detector, tmp_path / "d")
    state = safetensors.torch.load_file(copy / paths.DETECTOR_WEIGHTS)
    state.pop("fc.bias")
    safetensors.torch.save_file(state, copy / paths.DETECTOR_WEIGHTS,
                                metadata={"format": "dfutils.detector", "arch": "resnet18"})
    rehash(copy, paths.DETECTOR_WEIGHTS)
    with pytest.raises(DetectorError, match=r"do not fit resnet18.*fc\.bias"):
        load_detector(copy)
    # a file missing
    copy = tampered(detector, tmp_path / "e")
    (copy / paths.DETECTOR_WEIGHTS).unlink()
    with pytest.raises(DetectorError, match=r"model\.safetensors not found"):
        load_detector(copy)
    # not an exported folder at all
    with pytest.raises(DetectorError, match=r"config\.json not found"):
        load_detector(tmp_path / "a")  # (holds only the copy)


def test_predict_says_a_tampered_folder_in_one_line(trained, tmp_path):
    root, _, detector, _ = trained
    copy = tampered(detector, tmp_path)
    (copy / paths.DETECTOR_WEIGHTS).write_bytes(b"\x00" * 64)
    done = subprocess.run([sys.executable, "-m", "dfutils", "predict", "--model", str(copy),
                           str(root / "data" / "val")], capture_output=True, text=True)
    assert done.returncode == 2
    assert one_line_error(done.stderr).startswith(f"error: {copy / paths.DETECTOR_WEIGHTS} is "
                                                  "not the file exported")


def test_predicts_yes_no_options_never_take_a_file_name(trained, tmp_path):
    """`--onnx <folder>` scores the folder through ONNX Runtime; `--onnx=no` is PyTorch."""
    root, _, detector, _ = trained
    out = {}
    for flag in ("--onnx", "--onnx=no"):
        out[flag] = tmp_path / f"{flag[2:]}.csv"
        done = subprocess.run([sys.executable, "-m", "dfutils", "predict", "--model",
                               str(detector), flag, str(root / "data" / "val"), "--out",
                               str(out[flag])], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    rows = [out[f].read_text().splitlines() for f in out]
    assert len(rows[0]) == len(rows[1]) > 4


def test_export_writes_a_new_folder_only(trained, tmp_path):
    _, run, _, _ = trained
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files"):
        export_run(ExportParams(run_dir=str(run), out=str(taken)))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_run(ExportParams(run_dir=str(run), out=str(empty)))
    assert (empty / paths.DETECTOR_CONFIG).is_file()
    assert not list(tmp_path.glob(".*export*"))  # nothing left beside it


def test_training_writes_one_point_per_epoch_per_curve(trained):
    _, run, _, _ = trained
    history = (run / paths.HISTORY).read_text().splitlines()
    found = curves_of(run)
    assert {"loss/train", "loss/val", "auc/val", "train/learning_rate",
            "train/images_per_s"} <= set(found) <= set(TAGS.values())
    assert all(steps == list(range(1, len(history))) for steps in found.values())
    images = EventAccumulator(str(run / paths.TENSORBOARD), size_guidance={"images": 0})
    images.Reload()
    assert "roc" in images.Tags()["images"]


def test_a_resumed_run_continues_its_curves_without_duplicates(separable_split, tmp_path,
                                                               monkeypatch):
    """Epoch 2's points reach the event file, then the run dies before last.pt holds
    epoch 2: the resume runs epoch 2 again, and the reader keeps one point of it."""
    import dfutils.train as T

    params = TrainParams(data_dir=str(separable_split), run_dir=str(tmp_path / "run"),
                         **SETTINGS)
    real = T.save_last

    def dying(outputs, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(outputs, epoch, *args, **kwargs)
    monkeypatch.setattr(T, "save_last", dying)
    assert train_run(params)[0].interrupted
    assert curves_of(tmp_path / "run")["loss/val"] == [1, 2]
    monkeypatch.undo()
    resumed = train_run(TrainParams.from_mapping({**params.to_dict(), "resume": True}))[0]
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    found = curves_of(tmp_path / "run")
    assert found["loss/val"] == [1, 2, 3] and all(s == [1, 2, 3] for s in found.values())
    # trained anew in the same folder: the replaced training's curves go
    train_run(TrainParams.from_mapping({**params.to_dict(), "max_epochs": 1}))
    assert all(s == [1] for s in curves_of(tmp_path / "run").values())


def test_no_event_files_when_turned_off(separable_split, tmp_path):
    train_run(TrainParams(data_dir=str(separable_split), run_dir=str(tmp_path / "run"),
                          tensorboard=False, **{**SETTINGS, "max_epochs": 1}))
    assert not (tmp_path / "run" / paths.TENSORBOARD).exists()
    assert np.isfinite(json.loads((tmp_path / "run" / paths.METRICS).read_text())["auc"])
