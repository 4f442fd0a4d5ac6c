import csv
import io
import json
import subprocess
import sys

import numpy as np
import papermill
import pytest
import torch
from conftest import evaluate, make_raw, tree_digest, write_image
from PIL import Image

from dfutils import corruptions
from dfutils.__main__ import main
from dfutils.data import eval_transform
from dfutils.images import load_image
from dfutils.paths import REPO_ROOT


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    write_image(folder / "a.png", seed=1)
    write_image(folder / "sub" / "b.jpg", seed=2, fmt="JPEG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _rows(text: str) -> dict[str, dict]:
    return {row["path"]: row for row in csv.DictReader(io.StringIO(text))}


def test_predict_gives_one_row_per_file_with_its_status(run_dir, mixed_folder, capsys):
    assert main(["predict", "--run", str(run_dir), str(mixed_folder), "--num-workers", "0"]) == 0
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert set(rows) == {str(mixed_folder / n) for n in ("a.png", "sub/b.jpg", "broken.png",
                                                         "notes.txt")}
    for name in ("a.png", "sub/b.jpg"):
        row = rows[str(mixed_folder / name)]
        assert row["status"] == "ok" and row["label"] in ("real", "fake")
        assert 0 <= float(row["p_fake"]) <= 1
    for name in ("broken.png", "notes.txt"):
        row = rows[str(mixed_folder / name)]
        assert row["status"].startswith("error:") and row["p_fake"] == ""
        assert name in captured.err
    assert "threshold: P(fake) >= 0.5000" in captured.err


def test_predict_exit_status_is_non_zero_only_when_nothing_was_scored(run_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    out = tmp_path / "scores.csv"
    assert main(["predict", "--run", str(run_dir), str(tmp_path / "bad"), "--out", str(out),
                 "--num-workers", "0"]) == 1
    assert _rows(out.read_text())[str(tmp_path / "bad" / "x.png")]["status"].startswith("error")


def test_predicted_values_are_the_models_sigmoid_under_eval_preprocessing(run_dir, mixed_folder,
                                                                          tmp_path):
    out, cams = tmp_path / "p.csv", tmp_path / "cams"
    main(["predict", "--run", str(run_dir), str(mixed_folder / "a.png"), "--out", str(out),
          "--cam-dir", str(cams), "--num-workers", "0"])
    from dfutils.model import load_checkpoint

    model = load_checkpoint(run_dir / "model.pt").model
    x = eval_transform(32, "resnet18")(load_image(mixed_folder / "a.png")).unsqueeze(0)
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).item()
    assert float(_rows(out.read_text())[str(mixed_folder / "a.png")]["p_fake"]) == pytest.approx(
        expected, abs=1e-6)
    assert (cams / "a.png.cam.png").is_file()



def test_predict_in_bf16_runs_the_network_in_bf16_and_scores_close_to_float32(
        run_dir, mixed_folder, tmp_path):
    scores = {}
    for amp in ("off", "bf16"):
        out = tmp_path / f"{amp}.csv"
        assert main(["predict", "--run", str(run_dir), str(mixed_folder), "--out", str(out),
                     "--num-workers", "0", "--amp", amp]) == 0
        scores[amp] = {p: float(r["p_fake"]) for p, r in _rows(out.read_text()).items()
                       if r["status"] == "ok"}
    assert scores["off"].keys() == scores["bf16"].keys() and len(scores["off"]) == 2
    differences = [abs(scores["off"][p] - scores["bf16"][p]) for p in scores["off"]]
    assert 0 < max(differences) < 0.02

def test_jpeg_sweep_really_re_encodes_and_other_levels_behave():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    original = np.asarray(image).astype(int)
    assert np.abs(np.asarray(corruptions.jpeg(30)(image)).astype(int) - original).mean() > 5
    assert np.array_equal(np.asarray(corruptions.blur(0)(image)), original)
    assert np.array_equal(np.asarray(corruptions.downscale(1)(image)), original)
    assert not np.array_equal(np.asarray(corruptions.blur(2)(image)), original)
    assert corruptions.downscale(0.25)(image).size == image.size


def test_evaluate_writes_the_report_and_leaves_the_images_untouched(run_dir, tmp_path):
    data = make_raw(tmp_path / "labelled", 6, 6)
    before = tree_digest(data)
    report, _ = evaluate(run_dir, data, "held-out", batch_size=4,
                         sweeps={"jpeg": (100, 30), "blur": (0, 2),
                                                  "downscale": (1, 0.5)})
    assert tree_digest(data) == before
    out = run_dir / "eval" / "held-out"
    for name in ("report.json", "robustness.png", "reliability.png", "roc.png",
                 "confusion.png"):
        assert (out / name).is_file(), name
    assert report["n_images"] == 12 and report["threshold_rule"] == "0.5"
    assert [r["level"] for r in report["sweeps"]["jpeg"]] == [100, 30]
    assert report["sweeps"]["blur"][0]["auc"] == report["metrics"]["auc"]  # sigma 0 = clean
    assert 0 <= report["calibration"]["ece"] <= 1
    assert sum(b["n"] for b in report["calibration"]["bins"]) == 12


def _sources(root, layout: dict[str, dict[str, int]], seed: int = 0, frames: int = 0):
    """A labelled folder with a folder per source below each class: {class: {source: n}};
    with `frames`, each of the n is a clip's folder of that many frames."""
    for label, sources in layout.items():
        for source, n in sources.items():
            for i in range(n):
                for k in range(frames or 1):
                    name = f"clip{i}/{k}.png" if frames else f"{i}.png"
                    write_image(root / label / source / name, seed=seed + 1000 * len(source)
                                + (500 if label == "fake" else 0) + 10 * i + k)
    return root


def test_each_source_folder_is_scored_as_if_evaluated_alone(run_dir, tmp_path, capsys):
    """A combined data set's sources, each on its own: its fakes against its reals, the same
    numbers (intervals too) as evaluating that source's folder alone; a source with one
    class only is named, not scored."""
    # Source ab: 7 real and 6 fake clips of 2 frames (enough clips for intervals); cde and f
    # one class each.
    both = _sources(tmp_path / "both", {"real": {"ab": 7, "cde": 5},
                                        "fake": {"ab": 6, "f": 4}}, frames=2)
    alone = _sources(tmp_path / "alone", {"real": {"ab": 7}, "fake": {"ab": 6}}, frames=2)
    # One image a batch in both: the other images of a batch can move a score in its last
    # bits on some CPUs, and the EER threshold is a score.
    assert main(["evaluate", "--run", str(run_dir), "--data", str(both), "--by-source",
                 "--num-workers", "0", "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run_dir / "eval" / "both" / "report.json").read_text())
    evaluate(run_dir, alone, "alone", sweeps={"blur": (0,)}, num_workers=0, batch_size=1)
    single = json.loads((run_dir / "eval" / "alone" / "report.json").read_text())
    assert report["by_source"]["ab"] == single["metrics"]
    assert single["metrics"]["ci"]["auc"][0] is not None  # the intervals are compared too
    assert report["by_source"]["cde"] == {"n": 10, "why": "no fake image from cde"}
    assert report["by_source"]["f"] == {"n": 8, "why": "no real image from f"}
    assert report["n_images"] == 44 and report["metrics"] != single["metrics"]
    assert "source ab: images 26  AUC " in printed
    assert "source f: images 8  AUC not scored: no real image from f" in printed
    plain, _ = evaluate(run_dir, alone, "plain", sweeps={"blur": (0,)}, num_workers=0)
    assert "by_source" not in plain  # only when asked


@pytest.mark.parametrize("command", [["run-all"], ["faces"], ["split"], ["train"], ["gradcam"],
                                     ["evaluate"], ["benchmark"], ["predict"], ["demo"],
                                     ["merge", "faces"], ["merge", "predict"],
                                     ["merge", "evaluate"], ["check-notebooks"], ["params"]])
def test_every_command_has_help(command):
    done = subprocess.run([sys.executable, "-m", "dfutils", *command, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout


@pytest.mark.notebooks
def test_evaluate_notebook_runs(run_dir, tmp_path):
    data = _sources(tmp_path / "labelled", {"real": {"a": 4, "b": 2}, "fake": {"a": 4, "b": 2}})
    papermill.execute_notebook(REPO_ROOT / "notebooks/04-evaluate.ipynb", tmp_path / "o.ipynb",
                               parameters={"run_dir": str(run_dir), "eval_dir": str(data),
                                           "num_workers": 0, "by_source": True},
                               kernel_name="python3", progress_bar=False)
    report = (run_dir / "eval" / "labelled" / "report.json").read_text()
    assert '"by_source"' in report and "By source" in (tmp_path / "o.ipynb").read_text()


def test_by_source_on_a_data_set_is_by_method_and_says_so_where_there_is_none(
        run_dir, prepared, tmp_path, capsys):
    """Issue 36, item 10: on FF++ or Celeb-DF a "source" (the first folder) holds one class,
    so --by-source scored nothing; with no source folder it said nothing."""
    ffpp = prepared["ffpp"][0]
    report, _ = evaluate(run_dir, ffpp, "ffpp", split="test", by_source=True, num_workers=0,
                         sweeps={"blur": (0,)})
    assert set(report["by_source"]) == {"Deepfakes", "Face2Face"}
    assert report["by_source"]["Deepfakes"]["auc"] == report["by_method"]["Deepfakes"]["auc"]
    assert report["by_source_note"].startswith("a split of ffpp: its sources are its methods")
    plain = make_raw(tmp_path / "plain", 3, 3)
    assert main(["evaluate", "--run", str(run_dir), "--data", str(plain), "--by-source",
                 "--num-workers", "0"]) == 0
    assert "by source: no source folders (every image lies directly in real/ or fake/)" in (
        capsys.readouterr().out)
