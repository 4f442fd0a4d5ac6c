"""A user's files are never lost: every step writes only where it was told to, never
deletes or overwrites a file it did not create, and replaces a result only when the new
one is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    SMOKE,
    make_raw,
    make_split,
    one_line_error,
    rows_of,
    tree_digest,
    write_image,
)

from dfutils import pipeline
from dfutils.__main__ import main
from dfutils.split import SplitError

# -- the split never deletes what it did not write ------------------------------------------

@pytest.mark.parametrize("users_file", ["train/notes.txt", "manifest.csv", "masks/x.png", "val"])
def test_split_refuses_to_replace_anything_it_did_not_write(tmp_path, users_file):
    raw = make_raw(tmp_path / "raw", 4, 4)
    data = tmp_path / "data"
    (data / users_file).parent.mkdir(parents=True, exist_ok=True)
    (data / users_file).write_text("keep")
    before = tree_digest(data)
    with pytest.raises(SplitError, match=f"{users_file.split('/')[0]}.*not written by the split"):
        make_split(raw, data)
    assert tree_digest(data) == before


@pytest.mark.parametrize("where", ["train/notes.txt", "val/real/notes.txt", "masks/m.png"])
def test_overwrite_keeps_a_users_file_inside_an_existing_split(tmp_path, where):
    raw = make_raw(tmp_path / "raw", 6, 6)
    data = tmp_path / "data"
    make_split(raw, data, seed=1)
    (data / where).parent.mkdir(parents=True, exist_ok=True)
    (data / where).write_text("keep")
    before = tree_digest(data)
    with pytest.raises(SplitError, match=f"{where}.*not written by the split"):
        make_split(raw, data, seed=2, overwrite=True)
    assert tree_digest(data) == before
    (data / where).unlink()
    make_split(raw, data, seed=2, overwrite=True)  # once it is moved out, the split is replaced
    assert json.loads((data / "split_report.json").read_text())["params"]["seed"] == 2


def test_the_runner_refuses_a_blocked_split_before_any_notebook_runs(
        tmp_path, notebooks_that, capsys):
    raw = make_raw(tmp_path / "raw", 4, 4)
    (tmp_path / "p" / "train").mkdir(parents=True)
    (tmp_path / "p" / "train" / "notes.txt").write_text("keep")
    calls = notebooks_that()
    assert main(["run-all", "--replace-run", "--beside-data", f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'p'}", "STEPS=01-split"]) == 2
    assert "train is in the way" in one_line_error(capsys.readouterr().err)
    assert calls == [] and sorted(p.name for p in (tmp_path / "p").iterdir()) == ["train"]
    assert (tmp_path / "p" / "train" / "notes.txt").read_text() == "keep"


def test_only_the_splits_own_leftovers_of_a_killed_run_are_removed(tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    data = tmp_path / "data"
    ours, users = data / ".split-tmp-k1ll3d", data / ".split-tmp-mine"
    for folder in (ours, users):
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "x.png").write_text("x")
    (ours / ".dfutils-partial").touch()  # the marker paths.new_partial writes
    make_split(raw, data)
    assert not ours.exists() and (users / "train" / "x.png").read_text() == "x"

# -- predict writes only new files, outside its inputs --------------------------------------

def test_cam_dir_on_the_input_folder_is_refused_before_anything_is_written(
        run_dir, tmp_path, capsys):
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



def test_predicts_outputs_are_checked_against_each_other_and_the_inputs_first(
        run_dir, tmp_path, capsys, monkeypatch):
    """Two outputs on one path, an output that is an input, a --cam-dir that is a file and
    an --out that is a folder are refused before anything is scored or written."""
    from dfutils import predict

    clip, image = tmp_path / "clip.mp4", tmp_path / "a.png"
    clip.write_bytes(b"not read")
    write_image(image, seed=1)
    (tmp_path / "folder").mkdir()
    scored = []
    monkeypatch.setattr(predict, "score", lambda *a, **k: scored.append(a))
    base = ["predict", "--run", str(run_dir), str(image), str(clip), "--num-workers", "0"]
    cases = [
        (["--out", str(tmp_path / "p.csv"), "--frames-out", str(tmp_path / "p.csv")],
         "--out and --frames-out both name"),
        (["--out", str(tmp_path / "p.csv"), "--cam-dir", str(tmp_path / "p.csv")],
         "--out and --cam-dir both name"),
        (["--cam-dir", str(clip)], "is one of the inputs"),
        (["--cam-dir", str(tmp_path / "notes.txt")], "is a file: name a new or empty folder"),
        (["--out", str(tmp_path / "folder")], "is a folder: name a CSV file"),
    ]
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_digest(tmp_path)
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in one_line_error(capsys.readouterr().err), extra
    assert scored == [] and tree_digest(tmp_path) == before

def test_every_input_gets_its_own_overlay_and_none_is_overwritten(run_dir, tmp_path,
                                                                  capsys):
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


def test_out_never_overwrites_a_file_predict_did_not_write(run_dir, tmp_path, capsys):
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
def test_overwrite_with_a_bad_parameter_leaves_the_old_run_untouched(tmp_path, bad):
    runs = tmp_path / "runs"
    run = fake_run(runs)
    raw = make_raw(tmp_path / "raw", 4, 4)
    before = tree_digest(run)
    name = next(iter(bad))
    with pytest.raises(pipeline.ChainError, match=name):
        pipeline.run_all("good", SMOKE, {"raw_dir": str(raw), **bad}, overwrite=True,
                         runs_root=runs)
    assert tree_digest(run) == before and sorted(p.name for p in runs.iterdir()) == ["good"]


def test_a_folder_without_run_json_is_never_replaced(tmp_path):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "thesis.tex").write_text("x")
    raw = make_raw(tmp_path / "raw", 4, 4)
    with pytest.raises(pipeline.ChainError, match="not a run this tool made"):
        pipeline.run_all("mine", SMOKE, {"raw_dir": str(raw)}, overwrite=True, runs_root=runs)
    assert (runs / "mine" / "thesis.tex").read_text() == "x"


def test_an_interrupted_step_leaves_a_run_json_that_says_what_is_current(
        tmp_path, notebooks_that):
    runs = tmp_path / "runs"
    run = fake_run(runs, steps=("01-split", "02-train", "03-gradcam", "04-evaluate"))
    leftover = run / ".model.pt.a1b2c3d4.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"")
    (run / "notes.tmp").write_text("the user's")
    assert pipeline.summarise(run)["val_auc"] == 0.9
    data = tmp_path / "data"
    make_split(make_raw(tmp_path / "raw", 6, 6), data)  # train checks its split first
    notebooks_that(fail={"02-train": KeyboardInterrupt()})
    with pytest.raises(pipeline.ChainInterrupted, match="02-train was interrupted"):
        pipeline.run_all("good", SMOKE, {"data_dir": str(data)}, steps=["02-train", "03-gradcam"],
                         replace_run=True, runs_root=runs)
    record = json.loads((run / "run.json").read_text())
    steps = record["steps"]
    assert record["summary"]["val_auc"] is None  # the trained model is not current any more
    assert steps["02-train"]["status"] == "interrupted"
    assert steps["02-train"]["started"] <= steps["02-train"]["finished"]
    assert steps["01-split"]["status"] == "done"
    assert steps["03-gradcam"]["status"] == steps["04-evaluate"]["status"] == "stale"
    assert not leftover.exists() and (run / "notes.tmp").read_text() == "the user's"


def test_a_failed_replacement_puts_the_old_run_back(tmp_path, notebooks_that):
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


def test_a_dead_kernel_is_one_line_naming_the_step(tmp_path, notebooks_that, capsys):
    from nbclient.exceptions import DeadKernelError

    raw = make_raw(tmp_path / "raw", 4, 4)
    notebooks_that(fail={"01-split": DeadKernelError("Kernel died")})
    assert main(["run-all", "--runs-root", str(tmp_path / "runs"), f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'data'}", "STEPS=01-split"]) == 2
    assert "01-split failed: the notebook's kernel died" in one_line_error(
        capsys.readouterr().err.split("\n", 1)[1])  # after the "== 01-split" line


def test_ctrl_c_in_run_all_and_train_exits_130_in_one_line(tmp_path, notebooks_that, capsys,
                                                           monkeypatch, separable_split):
    raw = make_raw(tmp_path / "raw", 4, 4)
    notebooks_that(fail={"01-split": KeyboardInterrupt()})
    assert main(["run-all", "--runs-root", str(tmp_path / "runs"), f"RAW_DIR={raw}",
                 f"DATA_DIR={tmp_path / 'data'}"]) == 130
    assert one_line_error(capsys.readouterr().err).startswith("interrupted: 01-split")

    import dataclasses

    def interrupted(params):
        raise KeyboardInterrupt
    monkeypatch.setitem(pipeline.STEPS, "02-train", dataclasses.replace(
        pipeline.STEPS["02-train"], run=interrupted))
    assert main(["train", "--set", f"data_dir={separable_split}",
                 f"--run-dir={tmp_path / 'r'}"]) == 130
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["steps"]["02-train"]["status"] == "interrupted"
    assert one_line_error(capsys.readouterr().err) == "interrupted"

# -- the demo builder owns its folder the way the split and the faces step own theirs ------

def test_the_demo_keeps_a_users_file_and_an_interrupted_build_keeps_the_old_demo(
        tmp_path, monkeypatch):
    from dfutils import demo
    from dfutils.params import DemoParams

    out = tmp_path / "demo_raw"
    small = DemoParams(out=str(out), n_per_class=3, size=32, seed=1)
    demo.build_demo(small)
    before = tree_digest(out)
    assert demo.build_demo(small) == out and tree_digest(out) == before  # same settings: kept

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:  # Ctrl-C halfway through a rebuild with other settings
        m.setattr(demo, "self_blend", killed)
        with pytest.raises(KeyboardInterrupt):
            demo.build_demo(DemoParams(out=str(out), n_per_class=4, size=32, seed=2))
    assert tree_digest(out) == before and not list(out.glob(".demo-*"))
    (out / "real" / "mine.png").write_bytes(b"keep")
    with pytest.raises(ValueError, match="real/mine.png was not written by the demo builder"):
        demo.build_demo(DemoParams(out=str(out), n_per_class=4, size=32, seed=2))
    assert (out / "real" / "mine.png").read_bytes() == b"keep"
    (out / "real" / "mine.png").unlink()
    demo.build_demo(DemoParams(out=str(out), n_per_class=4, size=32, seed=2))
    assert len(list((out / "fake").glob("*.png"))) == 4


def test_two_steps_never_share_one_folder(tmp_path):
    """Issue 26, item 2: a faces folder re-split in place lost its faces.csv (both steps
    write that name), and the faces step then refused its own folder."""
    from dfutils import faces
    from dfutils.params import FacesParams

    raw = make_raw(tmp_path / "raw", 4, 4)
    make_split(raw, tmp_path / "d")
    before = tree_digest(tmp_path / "d")
    with pytest.raises(faces.FacesError, match="holds a split .* the faces step needs a "
                                               "folder of its own"):
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "d")))
    assert tree_digest(tmp_path / "d") == before

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "faces_report.json").write_text(json.dumps({"params": {},
                                                                  "fingerprint": ""}))
    (tmp_path / "f" / "faces.csv").write_text("path,label\n")
    before = tree_digest(tmp_path / "f")
    with pytest.raises(SplitError, match="holds faces .* the split needs a folder of its own"):
        make_split(raw, tmp_path / "f", overwrite=True)
    assert tree_digest(tmp_path / "f") == before


def test_a_refused_faces_step_writes_nothing_first(tmp_path, notebooks_that):
    """Issue 26, item 7: RAW_DIR=FACES_DIR was refused only after faces-run/ (a notebook and
    run.json) had been written inside the raw folder."""
    raw = make_raw(tmp_path / "raw", 2, 2)
    before = tree_digest(raw)
    calls = notebooks_that()
    with pytest.raises(pipeline.ChainError, match="must not contain each other"):
        pipeline.run_all(None, None, {"raw_dir": str(raw), "faces_dir": str(raw)},
                         steps=["00-faces"], replace_run=True, beside_data=True)
    assert tree_digest(raw) == before and not calls
