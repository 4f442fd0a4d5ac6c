"""A user's files are never lost, one bad file never stops a batch, and every mistake a user
can make is one line naming the file or value. Each test is named for what it protects; the
comment `# 13.N` ties it to the item of issue 13 it came from."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_raw, tree_digest, write_image
from PIL import Image, ImageOps

from dfutils import inference, pipeline
from dfutils.__main__ import main
from dfutils.data import ImageLoadError, ManifestDataset, Sample, eval_transform
from dfutils.model import CheckpointError, load_checkpoint, save_checkpoint
from dfutils.params import ParameterError, TrainParams, from_working_dir, load_params
from dfutils.paths import REPO_ROOT, remove_stale_temps
from dfutils.runs import environment
from dfutils.split import SplitError, split

SMOKE = "notebooks/params/smoke.yaml"
NOT_UTF8 = os.fsdecode(b"caf\xe9.png")  # a name Linux allows and UTF-8 cannot encode


def broken_exif_jpeg(path: Path) -> Path:
    """A JPEG whose pixels decode but whose EXIF makes the orientation step raise
    `struct.error: required argument is not an integer` (found by fuzzing one byte)."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0131] = 6, "Maker", "sw"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    data[data.index(b"Exif") + 17] = 41
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    with Image.open(path) as image:  # the premise: pixels fine, orientation step broken
        image.load()
        with pytest.raises(struct.error):
            ImageOps.exif_transpose(image)
    return path


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """Pillow's decompression-bomb limit lowered to 500 pixels, so small files test it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)


def rows_of(text: str) -> dict[str, dict]:
    return {row["path"]: row for row in csv.DictReader(io.StringIO(text))}


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and lines, err
    return lines[-1]


# -- the split never deletes what it did not write ------------------------------------------

@pytest.mark.parametrize("users_file", ["train/notes.txt", "manifest.csv", "masks/x.png", "val"])
def test_split_refuses_to_replace_anything_it_did_not_write(tmp_path, users_file):  # 13.1
    raw = make_raw(tmp_path / "raw", 4, 4)
    data = tmp_path / "data"
    (data / users_file).parent.mkdir(parents=True, exist_ok=True)
    (data / users_file).write_text("keep")
    before = tree_digest(data)
    with pytest.raises(SplitError, match=f"{users_file.split('/')[0]}.*not written by a split"):
        split(raw, data)
    assert tree_digest(data) == before


@pytest.mark.parametrize("where", ["train/notes.txt", "val/real/notes.txt", "masks/m.png"])
def test_overwrite_keeps_a_users_file_inside_an_existing_split(tmp_path, where):  # 13.1
    raw = make_raw(tmp_path / "raw", 6, 6)
    data = tmp_path / "data"
    split(raw, data, seed=1)
    (data / where).parent.mkdir(parents=True, exist_ok=True)
    (data / where).write_text("keep")
    before = tree_digest(data)
    with pytest.raises(SplitError, match=f"{where}.*not written by the split"):
        split(raw, data, seed=2, overwrite=True)
    assert tree_digest(data) == before
    (data / where).unlink()
    split(raw, data, seed=2, overwrite=True)  # once it is moved out, the split is replaced
    assert json.loads((data / "split_report.json").read_text())["params"]["seed"] == 2


def test_the_runner_refuses_a_blocked_split_before_any_notebook_runs(
        tmp_path, notebooks_that, capsys):  # 13.1
    raw = make_raw(tmp_path / "raw", 4, 4)
    (tmp_path / "p" / "train").mkdir(parents=True)
    (tmp_path / "p" / "train" / "notes.txt").write_text("keep")
    calls = notebooks_that()
    assert main(["run-all", "--replace-run", "--beside-data", f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'p'}", "STEPS=01-split"]) == 2
    assert "train is in the way" in one_line_error(capsys.readouterr().err)
    assert calls == [] and sorted(p.name for p in (tmp_path / "p").iterdir()) == ["train"]
    assert (tmp_path / "p" / "train" / "notes.txt").read_text() == "keep"


def test_only_the_splits_own_leftovers_of_a_killed_run_are_removed(tmp_path):  # 13.1
    raw = make_raw(tmp_path / "raw", 4, 4)
    data = tmp_path / "data"
    ours, users = data / ".split-tmp-k1ll3d", data / ".split-tmp-mine"
    for folder in (ours, users):
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "x.png").write_text("x")
    (ours / ".dfutils-partial").touch()  # the marker paths.new_partial writes
    split(raw, data)
    assert not ours.exists() and (users / "train" / "x.png").read_text() == "x"


# -- predict writes only new files, outside its inputs --------------------------------------

def test_cam_dir_on_the_input_folder_is_refused_before_anything_is_written(
        run_dir, tmp_path, capsys):  # 13.2
    images = tmp_path / "images"
    for name in ("a.png", "palette.png"):
        write_image(images / name, seed=len(name))
    before = tree_digest(images)
    for cam_dir in (images, images / "sub"):
        (images / "sub").mkdir(exist_ok=True)
        (images / "sub" / "keep.txt").write_text("x")
        before = tree_digest(images)
        assert main(["predict", "--run", str(run_dir), str(images), "--cam-dir", str(cam_dir),
                     "--num-workers", "0"]) == 2
        assert "inside the input folder" in one_line_error(capsys.readouterr().err)
        assert tree_digest(images) == before
    assert main(["predict", "--run", str(run_dir), str(images), "--out",
                 str(images / "p.csv")]) == 2
    assert not (images / "p.csv").exists()


def test_every_input_gets_its_own_overlay_and_none_is_overwritten(run_dir, tmp_path,
                                                                  capsys):  # 13.2
    images, cams = tmp_path / "images", tmp_path / "cams"
    write_image(images / "a.png", seed=1)
    write_image(images / "a.jpg", seed=2, fmt="JPEG")
    write_image(images / "a-2.png", seed=3)
    write_image(images / "sub" / "a.png", seed=4)
    args = ["predict", "--run", str(run_dir), str(images), "--cam-dir", str(cams),
            "--num-workers", "0"]
    assert main(args) == 0
    made = sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*.png"))
    assert made == ["a-2.png.cam.png", "a.jpg.cam.png", "a.png.cam.png", "sub/a.png.cam.png"]
    before = tree_digest(cams)
    assert main(args) == 2  # a second run would overwrite: refused, nothing touched
    assert "already holds" in one_line_error(capsys.readouterr().err)
    assert tree_digest(cams) == before


def test_out_never_overwrites_a_file_predict_did_not_write(run_dir, tmp_path, capsys):  # 13.2
    write_image(tmp_path / "in" / "a.png", seed=1)
    out = tmp_path / "results.csv"
    out.write_text("my,own,table\n")
    args = ["predict", "--run", str(run_dir), str(tmp_path / "in"), "--out", str(out)]
    assert main(args) == 2 and out.read_text() == "my,own,table\n"
    assert "not a CSV that predict wrote" in one_line_error(capsys.readouterr().err)
    out.unlink()
    assert main(args) == 0 and main(args) == 0  # its own CSV it may write again
    assert len(rows_of(out.read_text())) == 1


# -- a whole run is replaced only when its replacement succeeded ----------------------------

def fake_run(runs: Path, name: str = "good", steps: tuple = ("01-split", "02-train",
                                                             "03-gradcam")) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    (run / "gradcam").mkdir()
    (run / "gradcam" / "grid.png").write_bytes(b"png")
    record = {"run": name, "steps": {s: {"status": "done", "started": "2026-01-01T00:00:00",
                                         "finished": "2026-01-01T00:01:00",
                                         "metrics": {"auc": 0.9}} for s in steps}}
    (run / "run.json").write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("bad", [{"image_size": "-5"}, {"lr": "inf"}, {"lr": "nan"},
                                 {"min_delta": "nan"}, {"n_images": "0"}])
def test_overwrite_with_a_bad_parameter_leaves_the_old_run_untouched(tmp_path, bad):  # 13.3, 10
    runs = tmp_path / "runs"
    run = fake_run(runs)
    raw = make_raw(tmp_path / "raw", 4, 4)
    before = tree_digest(run)
    name = next(iter(bad))
    with pytest.raises(pipeline.ChainError, match=name):
        pipeline.run_all("good", SMOKE, {"raw_dir": str(raw), **bad}, overwrite=True,
                         runs_root=runs)
    assert tree_digest(run) == before and sorted(p.name for p in runs.iterdir()) == ["good"]


def test_a_folder_without_run_json_is_never_replaced(tmp_path):  # 13.3
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "thesis.tex").write_text("x")
    raw = make_raw(tmp_path / "raw", 4, 4)
    with pytest.raises(pipeline.ChainError, match="not a run this tool made"):
        pipeline.run_all("mine", SMOKE, {"raw_dir": str(raw)}, overwrite=True, runs_root=runs)
    assert (runs / "mine" / "thesis.tex").read_text() == "x"


def test_an_interrupted_step_leaves_a_run_json_that_says_what_is_current(
        tmp_path, notebooks_that):  # 13.4
    runs = tmp_path / "runs"
    run = fake_run(runs, steps=("01-split", "02-train", "03-gradcam", "04-evaluate"))
    leftover = run / ".model.pt.a1b2c3d4.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"")
    (run / "notes.tmp").write_text("the user's")
    assert pipeline.summarise(run)["val_auc"] == 0.9
    notebooks_that(fail={"02-train": KeyboardInterrupt()})
    with pytest.raises(pipeline.ChainInterrupted, match="02-train was interrupted"):
        pipeline.run_all("good", SMOKE, {}, steps=["02-train", "03-gradcam"], replace_run=True,
                         runs_root=runs)
    record = json.loads((run / "run.json").read_text())
    steps = record["steps"]
    assert record["summary"]["val_auc"] is None  # the trained model is not current any more
    assert steps["02-train"]["status"] == "interrupted"
    assert steps["02-train"]["started"] <= steps["02-train"]["finished"]
    assert steps["01-split"]["status"] == "done"
    assert steps["03-gradcam"]["status"] == steps["04-evaluate"]["status"] == "stale"
    assert not leftover.exists() and (run / "notes.tmp").read_text() == "the user's"


def test_a_failed_replacement_puts_the_old_run_back(tmp_path, notebooks_that):  # 13.3
    runs = tmp_path / "runs"
    run = fake_run(runs)
    before = tree_digest(run)
    raw = make_raw(tmp_path / "raw", 4, 4)
    notebooks_that(fail={"02-train": KeyboardInterrupt()})
    with pytest.raises(pipeline.ChainInterrupted, match="previous run is unchanged"):
        pipeline.run_all("good", SMOKE, {"raw_dir": str(raw)}, overwrite=True, runs_root=runs)
    assert tree_digest(run) == before
    (failed,) = [p for p in runs.iterdir() if p.name.startswith("good.failed-")]
    assert json.loads((failed / "run.json").read_text())["steps"]["02-train"]["status"] == (
        "interrupted")


def test_a_dead_kernel_is_one_line_naming_the_step(tmp_path, notebooks_that, capsys):  # 13.9
    from nbclient.exceptions import DeadKernelError

    raw = make_raw(tmp_path / "raw", 4, 4)
    notebooks_that(fail={"01-split": DeadKernelError("Kernel died")})
    assert main(["run-all", "--runs-root", str(tmp_path / "runs"), f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'data'}", "STEPS=01-split"]) == 2
    assert "01-split failed: the notebook's kernel died" in one_line_error(
        capsys.readouterr().err.split("\n", 1)[1])  # after the "== 01-split" line


def test_ctrl_c_in_run_all_and_train_exits_130_in_one_line(tmp_path, notebooks_that, capsys,
                                                           monkeypatch, separable_split):  # 13.9
    raw = make_raw(tmp_path / "raw", 4, 4)
    notebooks_that(fail={"01-split": KeyboardInterrupt()})
    assert main(["run-all", "--runs-root", str(tmp_path / "runs"), f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'data'}"]) == 130
    assert one_line_error(capsys.readouterr().err).startswith("interrupted: 01-split")

    import dfutils.train

    def interrupted(params):
        raise KeyboardInterrupt
    monkeypatch.setattr(dfutils.train, "train_run", interrupted)
    assert main(["train", "--set", f"data_dir={separable_split}"]) == 130
    assert one_line_error(capsys.readouterr().err) == "interrupted"


# -- one bad file never stops a batch --------------------------------------------------------

@pytest.mark.parametrize("size", [30, 40])  # over the limit: Pillow warns (30) or raises (40)
def test_predict_and_evaluate_score_the_rest_around_a_bomb_and_broken_exif(
        run_dir, tmp_path, small_pixel_limit, size, capsys):  # 13.5
    folder = tmp_path / "labelled"
    for i in range(3):
        write_image(folder / "real" / f"r{i}.png", seed=i, size=16)
        write_image(folder / "fake" / f"f{i}.png", seed=10 + i, size=16)
    write_image(folder / "real" / "bomb.png", seed=99, size=size)
    broken_exif_jpeg(folder / "fake" / "exif.jpg")
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run_dir), str(folder), "--out", str(out),
                 "--num-workers", "0"]) == 0
    rows = rows_of(out.read_text())
    assert len(rows) == 8 and sum(r["status"] == "ok" for r in rows.values()) == 6
    assert "too many pixels" in rows[str(folder / "real" / "bomb.png")]["status"]
    assert "required argument is not an integer" in rows[str(folder / "fake" / "exif.jpg")][
        "status"]
    report, _ = inference.evaluate_folder(run_dir, folder, "x", batch_size=4,
                                          sweeps={"jpeg": (100,)})
    assert report["n_images"] == 6
    assert sorted(Path(u["path"]).name for u in report["unreadable"]) == ["bomb.png", "exif.jpg"]


def test_the_split_rejects_what_training_cannot_load_with_its_reason(tmp_path):  # 13.6
    raw = make_raw(tmp_path / "raw", 4, 4)
    broken_exif_jpeg(raw / "fake" / "exif.jpg")
    report = split(raw, tmp_path / "data")
    (rejected,) = report["rejected"]
    assert rejected["path"] == "fake/exif.jpg" and "corrupt or unreadable" in rejected["reason"]
    dataset = ManifestDataset([Sample(raw / "fake" / "exif.jpg", 1, None)], eval_transform(32))
    with pytest.raises(ImageLoadError, match="exif.jpg"):
        dataset[0]


def test_file_names_that_are_not_utf8_do_not_stop_the_split_or_predict(run_dir,
                                                                       tmp_path):  # 13.7
    raw = make_raw(tmp_path / "raw", 4, 4)
    odd = raw / "real" / NOT_UTF8
    write_image(odd, seed=5)
    report = split(raw, tmp_path / "data")
    (skipped,) = report["skipped"]
    assert skipped["path"] == "real/caf\\xe9.png" and "not valid UTF-8" in skipped["reason"]
    json.loads((tmp_path / "data" / "split_report.json").read_text())  # valid JSON

    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run_dir), str(raw / "real"), "--out", str(out)]) == 0
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert rows[str(odd)]["status"] == "ok"  # read back with the same handler: the exact path
    done = subprocess.run([sys.executable, "-m", "dfutils", "predict", "--run", str(run_dir),
                           str(odd), "--num-workers", "0"], capture_output=True, timeout=300)
    assert done.returncode == 0 and os.fsencode(odd) + b",0." in done.stdout  # the name's bytes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_unreadable_files_are_listed_with_their_reason(run_dir, tmp_path, monkeypatch,
                                                                 capsys):  # 13.8
    raw = make_raw(tmp_path / "raw", 4, 4)
    os.mkfifo(raw / "real" / "pipe.png")
    locked = raw / "fake" / "locked.png"
    write_image(locked, seed=7)
    real_read = Path.read_bytes

    def read_bytes(path):  # root reads any file, so the refusal is simulated
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = split(raw, tmp_path / "data")
    assert report["skipped"] == [{"path": "real/pipe.png",
                                  "reason": "not a regular file: a FIFO (named pipe)"}]
    assert report["rejected"] == [{"path": "fake/locked.png",
                                   "reason": "cannot be read: Permission denied"}]
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run_dir), str(raw / "real" / "pipe.png"),
                 str(raw / "real" / "r000.png"), str(tmp_path / "missing.png"), "--out",
                 str(out)]) == 0
    rows = rows_of(out.read_text())
    assert rows[str(raw / "real" / "pipe.png")]["status"] == (
        "error: not a regular file: a FIFO (named pipe)")
    assert rows[str(tmp_path / "missing.png")]["status"] == "error: does not exist"
    assert rows[str(raw / "real" / "r000.png")]["status"] == "ok"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_a_file_without_read_permission_is_rejected_by_the_split(tmp_path):  # 13.8
    raw = make_raw(tmp_path / "raw", 4, 4)
    (raw / "real" / "r000.png").chmod(0)
    report = split(raw, tmp_path / "data")
    assert report["rejected"][0]["reason"].startswith("cannot be read")


# -- mistakes a user can make: one line naming the file or value ----------------------------

@pytest.mark.parametrize("text,expected", [("lr: [1, 2\n", "not valid YAML at line"),
                                           ("- 1\n- 2\n", "must be a mapping"),
                                           ("just words\n", "must be a mapping")])
def test_a_malformed_parameter_file_is_named(tmp_path, text, expected, capsys):  # 13.9
    params = tmp_path / "p.yaml"
    params.write_text(text)
    with pytest.raises(ParameterError, match=expected):
        load_params(TrainParams, str(params), {})
    assert main(["run-all", "--runs-root", str(tmp_path), f"PARAMS={params}"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(params) in line and expected in line


def test_train_with_missing_weights_is_one_line(tmp_path, separable_split, capsys):  # 13.9
    assert main(["train", "--set", f"data_dir={separable_split}", "--set",
                 f"run_dir={tmp_path / 'r'}", "--set", "weights=nowhere.pth", "--set",
                 "num_workers=0"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: weights file") and "nowhere.pth" in line


@pytest.mark.parametrize("change", ["wrong shapes", "no params"])
def test_a_checkpoint_that_is_not_ours_is_one_line(run_dir, tmp_path, change, capsys):  # 13.9
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    if change == "wrong shapes":
        state = {k: v for k, v in checkpoint["model_state"].items()}
        state["fc.weight"] = torch.zeros(2, 512)
        save_checkpoint(run_dir / "model.pt", state, params=checkpoint["params"], threshold=0.5,
                        threshold_rule="0.5", metrics={}, epoch=1)
    else:
        del checkpoint["params"]
        torch.save(checkpoint, run_dir / "model.pt")
    with pytest.raises(CheckpointError, match="do not fit ResNet18|lacks params"):
        load_checkpoint(run_dir / "model.pt")
    write_image(tmp_path / "a.png", seed=1)
    assert main(["predict", "--run", str(run_dir), str(tmp_path / "a.png")]) == 2
    assert str(run_dir / "model.pt") in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("key,value", [("lr", "inf"), ("lr", "nan"), ("min_delta", "nan"),
                                       ("weight_decay", "-inf"), ("jitter", "[0.2, NaN, 0, 0]")])
def test_non_finite_numbers_are_refused_by_name(key, value):  # 13.10
    with pytest.raises(ParameterError, match=key):
        load_params(TrainParams, None, {key: value})


def test_evaluate_with_one_class_unreadable_fails_with_a_message(run_dir, tmp_path,
                                                                 capsys):  # 13.10
    data = make_raw(tmp_path / "labelled", 3, 0)
    (data / "fake").mkdir(exist_ok=True)
    (data / "fake" / "f.png").write_bytes(b"not a png")
    assert main(["evaluate", "--run", str(run_dir), "--data", str(data)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no fake image" in line and "f.png" in line


# -- paths on the command line ---------------------------------------------------------------

def test_command_line_paths_are_relative_to_the_working_directory(run_dir, tmp_path,
                                                                  monkeypatch, capsys):  # 13.11
    make_raw(tmp_path / "labelled", 3, 3)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--run", "run", "labelled/real", "--out", "p.csv"]) == 0
    assert len(rows_of((tmp_path / "p.csv").read_text())) == 3
    assert main(["evaluate", "--run", "run", "--data", "labelled"]) == 0
    assert (run_dir / "eval" / "labelled" / "report.json").is_file()
    assert main(["evaluate", "--run", "run", "--data", "labelled", "--name", "../../x"]) == 2
    assert "plain name" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert from_working_dir({"data_dir": "d", "weights": "imagenet", "lr": "1"}, "/w") == {
        "data_dir": "/w/d", "weights": "imagenet", "lr": "1"}
    assert from_working_dir({"weights": "w.pth", "eval_dir": "~/e"}, "/w")["weights"] == (
        "/w/w.pth")


def test_run_all_reads_raw_dir_from_the_working_directory(tmp_path, notebooks_that,
                                                          monkeypatch):  # 13.11
    make_raw(tmp_path / "raw", 4, 4)
    calls = notebooks_that()
    monkeypatch.chdir(tmp_path)
    assert main(["run-all", "--runs-root", "runs", "RAW_DIR=raw", "DATA_DIR=d",
                 "STEPS=01-split"]) == 0
    assert calls[0][1]["raw_dir"] == str(tmp_path / "raw")
    assert (tmp_path / "runs").is_dir()


def test_make_hands_values_to_the_runner_exactly_as_typed(tmp_path):  # 13.12
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    values = ["RUN=a;touch pwned", "RAW_DIR=/data/photos (2024)", "NAME=it's", "X=$HOME",
              'Y=a "b"  c', "Z=$(shell touch pwned)", "W=`touch pwned`"]
    done = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run-all", f"PY={stub}",
                           f"STAMP={stub}", *values], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:3] == ["-m", "dfutils", "run-all"] and sorted(argv[3:]) == sorted(values)
    assert not (tmp_path / "pwned").exists() and not (REPO_ROOT / "pwned").exists()


@pytest.mark.notebooks
def test_make_split_keeps_its_notebook_beside_the_split(tmp_path):  # 13.13
    raw = make_raw(tmp_path / "raw", 4, 4)
    runs = tmp_path / "runs"
    run = pipeline.run_all(None, None, {"raw_dir": str(raw), "data_dir": str(tmp_path / "d")},
                           steps=["01-split"], replace_run=True, beside_data=True,
                           runs_root=runs)
    assert run == tmp_path / "d" / pipeline.SPLIT_RUN
    assert (run / "01-split.ipynb").is_file() and (run / "run.json").is_file()
    assert not runs.exists()
    again = pipeline.run_all(None, None, {"raw_dir": str(raw), "data_dir": str(tmp_path / "d")},
                             steps=["01-split"], replace_run=True, beside_data=True)
    assert again == run


def test_run_json_records_the_cpu_instruction_set():  # 13.14
    assert environment()["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()


def test_stale_temporary_files_are_ours_only(tmp_path):  # 13.4
    ours = [tmp_path / ".model.pt.ab12cd34.tmp", tmp_path / "g" / ".curves.png.x_y9z8w7.tmp"]
    theirs = [tmp_path / "notes.tmp", tmp_path / ".model.pt.tmp", tmp_path / "a.ab12cd34.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)
