"""The notebooks under papermill, alone and as the whole chain (marker `notebooks`)."""

import json
import subprocess
import sys

import papermill
import pytest
from conftest import make_raw, make_split, tree_digest

from dfutils import pipeline
from dfutils.demo import build_demo
from dfutils.params import DemoParams
from dfutils.paths import REPO_ROOT

pytestmark = pytest.mark.notebooks
SMOKE = "notebooks/params/smoke.yaml"


def test_split_notebook_runs_and_writes_the_split(tmp_path):
    raw = make_raw(tmp_path / "raw", 6, 6)
    (raw / "fake" / "broken.png").write_bytes(b"")
    before = tree_digest(raw)
    out = tmp_path / "01-split.ipynb"
    papermill.execute_notebook(REPO_ROOT / "notebooks/01-split.ipynb", out, kernel_name="python3",
                               parameters={"raw_dir": str(raw), "data_dir": str(tmp_path / "d")},
                               cwd=REPO_ROOT / "notebooks", progress_bar=False)
    report = json.loads((tmp_path / "d" / "split_report.json").read_text())
    assert report["counts"] == {"train": {"real": 5, "fake": 5}, "val": {"real": 1, "fake": 1}}
    assert [r["path"] for r in report["rejected"]] == ["fake/broken.png"]
    executed = json.loads(out.read_text())
    assert executed["metadata"]["papermill"]["parameters"]["raw_dir"] == str(raw)
    assert "fake/broken.png" in json.dumps(executed["cells"][-1]["outputs"])
    assert tree_digest(raw) == before


def test_an_unknown_parameter_is_refused_by_the_notebook(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter 'val_frac'"):
        papermill.execute_notebook(REPO_ROOT / "notebooks/01-split.ipynb", tmp_path / "o.ipynb",
                                   parameters={"val_frac": 0.3}, kernel_name="python3",
                                   progress_bar=False)


def test_an_unknown_parameter_is_refused_by_the_runner_before_anything_runs(tmp_path):
    with pytest.raises(pipeline.ChainError, match="unknown parameter 'epoch'"):
        pipeline.run_all("x", SMOKE, {"epoch": "3"}, runs_root=tmp_path)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The whole chain with smoke.yaml on a tiny demo set with a test split, evaluated on
    another set and benchmarked on its own test split."""
    root = tmp_path_factory.mktemp("chain")
    raw = build_demo(DemoParams(out=str(root / "demo_raw"), n_per_class=12, size=32, seed=1))
    other = build_demo(DemoParams(out=str(root / "other_raw"), n_per_class=4, size=32, seed=2))
    overrides = {"raw_dir": str(raw), "data_dir": str(root / "data"), "eval_dir": str(other),
                 "test_fraction": "0.2", "test_sets": str(root / "data")}
    return pipeline.run_all("smoke", SMOKE, overrides, runs_root=root / "runs")


def test_the_chain_writes_every_artefact(smoke_run):
    for name in ("01-split.ipynb", "02-train.ipynb", "03-gradcam.ipynb", "04-evaluate.ipynb",
                 "05-benchmark.ipynb", "benchmark.csv", "benchmark.png",
                 "eval/other_raw/report.json", "model.pt",
                 "history.csv", "metrics.json", "val_predictions.csv", "curves.png", "roc.png",
                 "confusion.png", "scores.png", "gradcam/grid.png", "gradcam/cam_metrics.json",
                 "gradcam/deletion.png", "run.json"):
        assert (smoke_run / name).is_file(), name
    overlays = [p for p in (smoke_run / "gradcam").glob("*.png")
                if p.name not in ("grid.png", "deletion.png")]
    assert len(overlays) == 4  # n_images in smoke.yaml


def test_run_json_records_parameters_versions_timings_and_metrics(smoke_run):
    run = json.loads((smoke_run / "run.json").read_text())
    assert set(run["steps"]) == {"01-split", "02-train", "03-gradcam", "04-evaluate",
                                 "05-benchmark"}
    assert run["steps"]["04-evaluate"]["metrics"]["name"] == "other_raw"
    assert run["git"]["commit"] is None or len(run["git"]["commit"]) == 40
    assert run["environment"]["packages"]["torch"].startswith("2.14.1")
    for step in run["steps"].values():
        assert step["status"] == "done" and step["seconds"] > 0
        assert step["started"] <= step["finished"]
    assert run["steps"]["02-train"]["params"]["max_epochs"] == 2
    assert run["steps"]["02-train"]["params"]["run_dir"] == str(smoke_run)
    counts = run["steps"]["01-split"]["metrics"]["counts"]
    assert counts["val"] == counts["test"] == {"real": 2, "fake": 2}
    assert counts["train"]["fake"] == 8
    train = run["steps"]["02-train"]["metrics"]
    assert 0 <= train["auc"] <= 1 and 1 <= train["best_epoch"] <= 2
    cam = run["steps"]["03-gradcam"]["metrics"]
    assert 0 <= cam["deletion"]["auc_cam"] <= 1 and cam["localization"]["n"] == 2
    assert run["summary"]["val_auc"] == train["auc"]
    assert set(run["summary"]["test_video_auc"]) == {"data"}  # the test set's folder name


def test_a_failing_step_stops_the_chain_with_a_non_zero_exit(tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    command = [sys.executable, "-m", "dfutils", "run-all", "--runs-root", str(tmp_path / "runs"),
               "RUN=broken", f"PARAMS={SMOKE}", f"RAW_DIR={raw}", f"DATA_DIR={tmp_path / 'd'}",
               f"WEIGHTS={tmp_path / 'missing.pth'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "02-train failed in cell" in done.stderr and "missing.pth" in done.stderr
    assert (tmp_path / "runs/broken/02-train.ipynb").is_file()  # kept, partly executed
    assert not (tmp_path / "runs/broken/03-gradcam.ipynb").exists()
    run = json.loads((tmp_path / "runs/broken/run.json").read_text())
    assert run["steps"]["02-train"]["status"] == "failed"
    # and the run folder is not overwritten unless asked
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "OVERWRITE=1" in again.stderr


def test_missing_raw_images_point_to_the_demo(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dfutils", "run-all", "--runs-root",
                           str(tmp_path), f"RAW_DIR={tmp_path / 'none'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "make demo" in done.stderr


def test_resume_runs_only_what_is_not_done_with_the_recorded_parameters(tmp_path,
                                                                      notebooks_that):
    raw = make_raw(tmp_path / "raw", 4, 4)
    runs = tmp_path / "runs"
    notebooks_that(fail={"02-train": KeyboardInterrupt()})
    with pytest.raises(pipeline.ChainInterrupted):
        pipeline.run_all("r", SMOKE, {"raw_dir": str(raw), "data_dir": str(tmp_path / "data"),
                                      "lr": "0.01"}, runs_root=runs)
    steps = json.loads((runs / "r" / "run.json").read_text())["steps"]
    assert [steps[s]["status"] for s in ("01-split", "02-train", "03-gradcam")] == [
        "done", "interrupted", "pending"]
    (runs / "r" / "last.pt").write_bytes(b"state")  # what 02-train leaves after an epoch
    make_split(raw, tmp_path / "data")  # what 01-split left (the notebooks here are stand-ins)
    calls = notebooks_that()
    with pytest.raises(pipeline.ChainError, match="give only RUN"):
        pipeline.run_all("r", None, {"lr": "0.1"}, runs_root=runs, resume=True)
    pipeline.run_all("r", runs_root=runs, resume=True)
    assert [step for step, _ in calls] == ["02-train", "03-gradcam"]
    train = calls[0][1]
    assert train["resume"] is True and train["lr"] == 0.01 and train["max_epochs"] == 2
    assert {k: v for k, v in train.items() if k != "resume"} == {
        k: v for k, v in steps["02-train"]["params"].items() if k != "resume"}
    with pytest.raises(pipeline.ChainError, match="nothing to resume"):
        pipeline.run_all("r", runs_root=runs, resume=True)


def test_the_demo_gives_what_the_readme_says(tmp_path):
    """`make demo`'s chain, checked against the bounds the README promises on any CPU (the
    same seed gives different numbers on another CPU generation, so not the exact figures)."""
    import re

    readme = (REPO_ROOT / "docs" / "demo.md").read_text()
    found = re.search(r"on any CPU, expect validation AUC >= ([0-9.]+) and accuracy\s+>= "
                      r"([0-9.]+)", readme, re.IGNORECASE)
    assert found, "docs/demo.md states what make demo gives on any CPU"
    auc_min, accuracy_min = map(float, found.groups())
    raw = build_demo(DemoParams(out=str(tmp_path / "demo_raw")))  # the data set `make demo` builds
    run = pipeline.run_all("demo", "notebooks/params/demo.yaml",
                           {"raw_dir": str(raw), "data_dir": str(tmp_path / "demo")},
                           runs_root=tmp_path / "runs")
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["val_auc"] >= auc_min and summary["val_accuracy"] >= accuracy_min
    assert 1 <= summary["best_epoch"] <= 16
    for key in ("deletion_auc_cam", "deletion_auc_random", "pointing_cam", "pointing_random"):
        assert 0 <= summary[key] <= 1
        assert summary[f"{key}_ci"][0] <= summary[key] <= summary[f"{key}_ci"][1]
    # The explanation points at the blends: Grad-CAM against random maps, on the paired
    # difference's interval (docs/demo.md: the same for three seeds)
    cam = json.loads((run / "gradcam" / "cam_metrics.json").read_text())
    assert cam["layer"] == "last-1"  # auto at 96 px: ResNet18's layer3
    assert cam["localization"]["ci"]["difference"][0] > 0
    assert summary["pointing_cam"] >= 2 * summary["pointing_random"]
    assert cam["deletion"]["ci"]["difference"][1] < 0


def test_summarise_counts_only_the_steps_that_are_done_and_current(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    steps = {"01-split": {"status": "done", "seconds": 2.0, "metrics": {"n_images": 8}},
             "02-train": {"status": "done", "seconds": 10.0,
                          "metrics": {"auc": 0.8, "accuracy": 0.7, "best_epoch": 3}},
             "03-gradcam": {"status": "stale", "seconds": 5.0, "metrics": {
                 "deletion": {"auc_cam": 0.2, "auc_random": 0.4},
                 "localization": {"pointing_cam": 0.9, "pointing_random": 0.1}}}}
    (run / "run.json").write_text(json.dumps({"steps": steps}))
    summary = pipeline.summarise(run)
    assert (summary["val_auc"], summary["val_accuracy"], summary["best_epoch"]) == (0.8, 0.7, 3)
    assert summary["deletion_auc_cam"] is None and summary["pointing_cam"] is None
    assert summary["seconds"] == 12.0
    assert json.loads((run / "run.json").read_text())["summary"] == summary
