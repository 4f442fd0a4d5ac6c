"""The cross-dataset table (05-benchmark): one trained run on the test splits of the
published data sets' layouts (conftest), checked against a hand computation, and the same
evaluation as `evaluate --split test`, presented as a table."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate, make_raw
from sklearn.metrics import roc_auc_score

from dfutils import benchmark, paths, pipeline
from dfutils.export import export_run
from dfutils.manifest import identity
from dfutils.metrics import (
    binary_intervals,
    binary_metrics,
    metrics_line,
    shown,
    too_few,
    video_scores,
    with_intervals,
)
from dfutils.model import build_model, save_checkpoint
from dfutils.params import BenchmarkParams, ExportParams, SplitParams
from dfutils.split import split


def sbi_score(frames, areas, scores) -> float:
    return video_scores(["v"] * len(frames), [1] * len(frames), scores, "sbi", frames,
                        areas)[2][0]


def test_the_sbi_rule_takes_the_top_face_among_the_large_ones_per_frame():
    # frame 0: a large face at 0.2 and a small one (under half its size) at 0.9
    assert sbi_score([0, 0, 1], [100, 40, 100], [0.2, 0.9, 0.6]) == pytest.approx(
        (0.2 + 0.6) / 2)
    # two large faces in one frame: the higher counts
    assert sbi_score([0, 0], [100, 60], [0.2, 0.9]) == pytest.approx(0.9)
    # frames of unknown number each count alone
    assert sbi_score([-1, -1], [100, 100], [0.2, 0.9]) == pytest.approx(0.55)


def test_the_cluster_bootstrap_is_wider_than_counting_each_frame_as_independent():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1] * 10, 8)
    scores = np.repeat(rng.uniform(0, 1, 20) + np.tile([0, 0.3], 10), 8)  # frames = video
    videos = np.repeat(np.arange(20), 8)
    auc = roc_auc_score(labels, scores)
    by_video = binary_intervals(labels, scores, 0.5, videos, 400)["auc"]
    by_frame = binary_intervals(labels, scores, 0.5, None, 400)["auc"]
    assert by_video[0] <= auc <= by_video[1]
    assert by_video[1] - by_video[0] > 1.5 * (by_frame[1] - by_frame[0])


@pytest.fixture(scope="module")
def table(prepared, tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("bench") / "run"
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    report = benchmark.run_benchmark(BenchmarkParams(
        run_dir=str(run), test_sets=[str(prepared[n][0]) for n in ("ffpp", "celebdf", "dfdc")],
        num_workers=0, n_bootstrap=50))
    return run, report


def test_an_exported_run_gives_its_table_and_its_card_shows_it(table, prepared, tmp_path):
    """Issue 39: the card's cross-dataset rows and explanation verdicts are the run's
    benchmark.json; the exported folder (--model) gives the run's table."""
    run, report = table
    detector = tmp_path / "detector"
    export_run(ExportParams(run_dir=str(run), out=str(detector), onnx=False))
    text = (detector / paths.DETECTOR_CARD).read_text()
    for r in report["rows"]:
        if r["rule"] in ("frame", "mean"):
            assert (f"| {r['test_set']} | {r['method']} | {r['level']} | "
                    f"{shown(r['auc'], [r['auc_low'], r['auc_high']])} |") in text
    for r in report["explanations"]:
        assert f"pointing game {r['pointing_cam']:.3f}" in text and r["pointing_verdict"] in text
    ffpp = str(prepared["ffpp"][0])
    ours = {(r["method"], r["level"], r["rule"], k): r[k] for r in report["rows"]
            for k in ("auc", "eer") if r["test_set"] == "ffpp"}
    again = benchmark.run_benchmark(BenchmarkParams(
        run_dir=str(tmp_path / "out"), model_dir=str(detector), test_sets=[ffpp],
        num_workers=0, n_bootstrap=50, n_explain=0))
    assert {(r["method"], r["level"], r["rule"], k): r[k] for r in again["rows"]
            for k in ("auc", "eer")} == pytest.approx(ours, nan_ok=True)
    assert again["scored_by"] == "PyTorch"


def test_the_table_has_frame_and_video_rows_per_test_set_and_method(table):
    run, report = table
    with open(run / paths.BENCHMARK, newline="") as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["test_set"], r["method"], r["level"], r["rule"]) for r in rows}
    for method in ("all", "Deepfakes", "Face2Face"):
        for level, rule in benchmark.LEVELS:
            assert ("ffpp", method, level, rule) in kinds
    assert {("celebdf", "all"), ("dfdc", "all")} <= {(t, m) for t, m, _, _ in kinds}
    assert all((run / name).is_file() for name in (
        paths.BENCHMARK_JSON, paths.BENCHMARK_FIGURE, paths.BENCHMARK_VIDEOS,
        paths.BENCHMARK_FRAMES))
    assert set(report["headline"]) == {"ffpp", "celebdf", "dfdc"}


def test_the_tables_numbers_are_those_of_the_scores_it_writes(table):
    run, report = table
    with open(run / paths.BENCHMARK_FRAMES, newline="") as f:
        frames = [r for r in csv.DictReader(f) if r["test_set"] == "ffpp"]
    rows = {(r["method"], r["level"], r["rule"]): r for r in report["rows"]
            if r["test_set"] == "ffpp"}
    labels = np.array([int(r["label"]) for r in frames])
    scores = np.array([float(r["p_fake"]) for r in frames])
    assert rows["all", "frame", "-"]["auc"] == pytest.approx(roc_auc_score(labels, scores),
                                                             abs=1e-5)
    assert rows["all", "frame", "-"]["n_frames"] == len(frames) == 12  # 6 clips x 2 frames
    videos: dict[str, list] = {}
    for r in frames:
        videos.setdefault(r["video"], [int(r["label"]), []])[1].append(float(r["p_fake"]))
    df = {v: (y, np.mean(s)) for v, (y, s) in videos.items()
          if y == 0 or "/Deepfakes/" in v}
    assert rows["Deepfakes", "video", "mean"]["auc"] == pytest.approx(
        roc_auc_score([y for y, _ in df.values()], [p for _, p in df.values()]), abs=1e-5)
    assert rows["Deepfakes", "video", "mean"]["n_videos"] == 4  # 2 reals + 2 fakes of DF
    accuracy = np.mean([(p >= 0.5) == y for y, p in df.values()])
    assert rows["Deepfakes", "video", "mean"]["accuracy"] == pytest.approx(accuracy)


def test_a_test_video_without_a_face_is_counted_and_scores_a_half_by_the_sbi_rule(table):
    run, report = table
    rows = {(r["level"], r["rule"]): r for r in report["rows"]
            if r["test_set"] == "dfdc" and r["method"] == "all"}
    assert rows["video", "sbi"]["n_videos"] == rows["video", "mean"]["n_videos"] + 1 == 4
    assert rows["video", "mean"]["n_no_face"] == 1
    with open(run / paths.BENCHMARK_VIDEOS, newline="") as f:
        [t3] = [r for r in csv.DictReader(f) if r["video"] == "test/t3.mp4"]
    assert (t3["n_frames"], t3["p_fake_mean"], t3["p_fake_sbi"]) == ("0", "", "0.500000")


def test_a_split_without_a_test_split_is_refused_by_name(table, prepared, tmp_path):
    run, _ = table
    make_raw(tmp_path / "raw", 3, 3)
    split(SplitParams(raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "plain")))
    with pytest.raises(ValueError, match=f"the split in {tmp_path / 'plain'} has no test"):
        benchmark.run_benchmark(BenchmarkParams(run_dir=str(run),
                                                test_sets=[str(tmp_path / "plain")]))


def test_make_benchmark_needs_a_trained_run_and_names_it(tmp_path):
    with pytest.raises(pipeline.ChainError, match="model.pt not found: RUN=<name> must name"):
        pipeline.run_all("untrained", overrides={"test_sets": str(tmp_path)},
                         steps=["05-benchmark"], runs_root=tmp_path / "runs", replace_run=True)
    assert not (tmp_path / "runs" / "untrained").exists()
    trained = tmp_path / "runs" / "trained"
    save_checkpoint(trained / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    (trained / paths.RUN_RECORD).write_text("{}")
    with pytest.raises(pipeline.ChainError, match="nowhere holds no manifest.csv: name split"):
        pipeline.run_all("trained", overrides={"test_sets": str(tmp_path / "nowhere")},
                         steps=["05-benchmark"], runs_root=tmp_path / "runs", replace_run=True)
    assert sorted(p.name for p in trained.iterdir()) == [paths.MODEL, paths.RUN_RECORD]
    assert pipeline.choose_steps(None, None, {"test_sets": "x"}, {})[-1] == "05-benchmark"


def test_the_table_and_evaluate_on_the_test_split_are_one_evaluation(table, prepared):
    """`evaluate --split test` and 05-benchmark score and assess the same images the same
    way: the table's frame row is the report's metrics, its video row (mean rule) the
    report's videos, its method rows the report's `by_method`, intervals included."""

    run, report = table
    data_dir = prepared["ffpp"][0]
    found, _ = evaluate(run, data_dir, "ffpp-test", split="test", num_workers=0,
                        n_bootstrap=50, sweeps={"blur": (0,)})
    rows = {(r["method"], r["level"], r["rule"]): r for r in report["rows"]
            if r["test_set"] == "ffpp"}
    for metrics, row in ((found["metrics"], rows["all", "frame", "-"]),
                         (found["metrics"]["video"], rows["all", "video", "mean"]),
                         (found["by_method"]["Deepfakes"], rows["Deepfakes", "frame", "-"])):
        for name in ("auc", "ap", "eer", "accuracy"):
            assert metrics[name] == pytest.approx(row[name], abs=1e-9, nan_ok=True), name
            assert metrics["ci"][name] == pytest.approx(
                [row[f"{name}_low"], row[f"{name}_high"]], abs=1e-9, nan_ok=True), name
        assert metrics["ci"].get("unavailable", "") == row["note"]  # 2 clips a side: none


def test_a_test_split_made_again_since_training_is_refused(tmp_path):
    """The benchmark reads a test split only while it is the split the run trained on (or
    another folder): after a re-split in place its test images may have been trained on."""

    raw = make_raw(tmp_path / "raw", 8, 8)
    data = tmp_path / "data"
    split(SplitParams(raw_dir=str(raw), data_dir=str(data), test_fraction=0.25))
    run = tmp_path / "run"
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1, split=identity(data))
    params = BenchmarkParams(run_dir=str(run), test_sets=[str(data)], num_workers=0,
                             n_bootstrap=20)
    assert benchmark.run_benchmark(params)["headline"]
    split(SplitParams(raw_dir=str(raw), data_dir=str(data), test_fraction=0.25, seed=7,
                      overwrite=True))
    with pytest.raises(ValueError, match="cannot score its test split: the split in .* is not "
                                         "the one"):
        benchmark.run_benchmark(params)


def _run_on(data: Path, tmp_path, name: str = "run") -> Path:
    """A run folder whose checkpoint records that it trained on the split in `data`."""

    run = tmp_path / name
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1, split=identity(data))
    return run


def test_a_test_set_holding_the_runs_training_images_is_refused_by_name(tmp_path):
    """Issue 36, item 3: a test set split from the run's own training images was scored
    without a word."""

    raw = make_raw(tmp_path / "raw", 12, 12)
    split(SplitParams(raw_dir=str(raw), data_dir=str(tmp_path / "a"), test_fraction=0.2))
    split(SplitParams(raw_dir=str(raw), data_dir=str(tmp_path / "b"), test_fraction=0.2,
                      seed=5))  # the same images, other sides
    run = _run_on(tmp_path / "a", tmp_path)
    with pytest.raises(ValueError, match=r"cannot score its test split: \d+ of its \d+ test "
                                         "images of .*/b are images .* trained or chose"):
        benchmark.run_benchmark(BenchmarkParams(run_dir=str(run), test_sets=[str(tmp_path / "b")],
                                                num_workers=0))
    with pytest.raises(ValueError, match="cannot evaluate on its test split: .* trained or"):
        evaluate(run, tmp_path / "b", "b", split="test", num_workers=0, sweeps={"blur": (0,)})
    assert benchmark.run_benchmark(BenchmarkParams(  # its own test split is fine
        run_dir=str(run), test_sets=[str(tmp_path / "a")], num_workers=0, n_bootstrap=20))


def test_test_sets_are_refused_before_the_run_is_touched(tmp_path):
    """Issue 36, item 11: two TEST_SETS of one folder name, or one without a test split, were
    refused inside the notebook after run.json was changed."""
    raw = make_raw(tmp_path / "raw", 6, 6)
    for folder, fraction in (("x/data", 0.2), ("y/data", 0.2), ("plain", 0.0)):
        split(SplitParams(raw_dir=str(raw), data_dir=str(tmp_path / folder),
                          test_fraction=fraction))
    runs = tmp_path / "runs"
    run = _run_on(tmp_path / "x/data", runs, "r")
    (run / paths.RUN_RECORD).write_text(json.dumps({"steps": {}, "summary": {"kept": 1}}))
    before = (run / paths.RUN_RECORD).read_text()
    for sets, message in (([tmp_path / "x/data", tmp_path / "y/data"], "two test sets are "
                                                                       "folders named 'data'"),
                          ([tmp_path / "plain"], "has no test images")):
        with pytest.raises(pipeline.ChainError, match=message):
            pipeline.run_all("r", overrides={"test_sets": ",".join(map(str, sets))},
                             steps=["05-benchmark"], runs_root=runs, replace_run=True)
        assert (run / paths.RUN_RECORD).read_text() == before


def test_a_one_class_test_set_says_its_auc_is_undefined_and_why(tmp_path):
    """Issue 36, item 6: the benchmark wrote its tables, recorded the step done, then died in
    the summary on a None AUC."""

    raw = make_raw(tmp_path / "raw", 8, 8)
    data = tmp_path / "data"
    split(SplitParams(raw_dir=str(raw), data_dir=str(data), test_fraction=0.25))
    with open(data / paths.MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if not (r["split"] == "test" and r["label"] == "fake")]
    with open(data / paths.MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = _run_on(tmp_path / "elsewhere", tmp_path)
    params = BenchmarkParams(run_dir=str(run), test_sets=[str(data)], num_workers=0)
    report = benchmark.run_benchmark(params)
    row = next(r for r in report["rows"] if r["level"] == "video" and r["rule"] == "mean")
    assert np.isnan(row["auc"]) and row["note"].startswith("no fake video in this test split")
    summary = benchmark.summary(benchmark.record(params))
    (line,) = benchmark.summary_lines(summary)
    assert "video AUC undefined (no fake video in this test split" in line


def test_an_interval_needs_five_of_each_class_and_says_so_otherwise():
    """Issue 36, item 16: one real and one fake video gave `AUC 1.000 [1.00, 1.00]`, an
    interval that claims certainty."""

    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    videos = np.array(["r", "r", "f", "f"])  # one video of each class, two frames each
    m = with_intervals(binary_metrics(labels, scores, 0.5), labels, scores, videos, 200)
    assert m["auc"] == 1.0 and all(np.isnan(m["ci"][k]).all() for k in ("auc", "ap"))
    assert m["ci"]["unavailable"] == ("only 1 real and 1 fake to resample (a clip's frames "
                                      "count once); an interval needs 5 of each class")
    assert metrics_line(m).startswith("AUC 1.000  AP 1.000") and "(no intervals: only 1" in (
        metrics_line(m))
    five = np.repeat([0, 1], 5)
    assert not too_few(five, None) and too_few(five[1:], None).startswith("only 4 reals")


# -- where the explanations point ----------------------------------------------------------

@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """A split whose 16 test fakes (each its own video) have a mask: their left half."""
    from PIL import Image

    root = tmp_path_factory.mktemp("masked")
    raw = make_raw(root / "raw", 16, 32)
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    for fake in (raw / "fake").glob("*.png"):
        Image.fromarray(left).save(fake.with_name(f"{fake.stem}_mask.png"))
    data = root / "data"
    split(SplitParams(raw_dir=str(raw), data_dir=str(data), test_fraction=0.5))
    return data


@pytest.mark.parametrize("points,said", [("left", "better"), ("right", "worse")])
def test_maps_made_to_hit_or_miss_the_masks_get_those_verdicts(masked, tmp_path, monkeypatch,
                                                                points, said):
    """The explanation rows of maps constructed to lie on the masks (a ramp falling from the
    left edge) or off them (rising to the right edge), around the real scoring path."""
    from dfutils.cam import CamResult

    real = benchmark.explain

    def constructed(checkpoint, images, target, batch_size, layer):
        inputs, cams = real(checkpoint, images, target, batch_size, layer)
        ramp = np.linspace(1, 0, 64, dtype=np.float32)
        ramp = ramp if points == "left" else ramp[::-1]
        maps = np.broadcast_to(ramp, (len(images), 64, 64)).copy()
        return inputs, CamResult(maps, cams.p_fake, cams.explained, cams.grid)

    monkeypatch.setattr(benchmark, "explain", constructed)
    run = tmp_path / "run"
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 64, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    params = BenchmarkParams(run_dir=str(run), test_sets=[str(masked)], num_workers=0,
                             n_bootstrap=200, n_explain=10)
    report = benchmark.run_benchmark(params)
    (row,) = report["explanations"]
    assert (row["method"], row["masks"], row["n_crops"], row["n_videos"]) == (
        "all", "mask", 10, 10)  # n_explain of the test fakes with a mask
    assert row["layer"] == "last-2" and row["note"] == ""
    hit = points == "left"
    assert row["pointing_cam"] == (1.0 if hit else 0.0)
    assert row["iou_cam"] == pytest.approx(1.0 if hit else 0.0, abs=0.05)
    assert row["energy_cam"] == pytest.approx(0.75 if hit else 0.25, abs=0.02)
    for measure in ("pointing", "energy", "iou"):
        assert row[f"{measure}_verdict"] == said, measure
        assert (row[f"{measure}_low"] > 0) == hit and (row[f"{measure}_high"] < 0) != hit
    assert row["deletion_verdict"] in ("better", "worse", "not told apart")
    with open(run / paths.BENCHMARK_EXPLANATIONS, newline="") as f:
        (written,) = csv.DictReader(f)
    assert written["pointing_verdict"] == said
    assert (run / paths.BENCHMARK_EXPLANATIONS_FIGURE).is_file()
    assert [p.name for p in (run / paths.BENCHMARK_CAMS).iterdir()] == ["data-all.png"]
    summary = benchmark.summary(benchmark.record(params))
    assert summary["test_explanations"]["data · all · last-2"]["pointing"]["verdict"] == said
    assert any(line.startswith("Grad-CAM on data · all · last-2 (10 crops, masks): pointing "
                               f"game {row['pointing_cam']:.3f}") and f"({said})" in line
               for line in benchmark.summary_lines(summary))

    mine = run / paths.BENCHMARK_CAMS / "my-notes.png"  # a user's file beside the grids
    mine.write_bytes(b"mine")
    benchmark.run_benchmark(dataclasses.replace(params, n_explain=0))  # asked for none:
    assert not (run / paths.BENCHMARK_EXPLANATIONS).exists()  # no stale rows are left
    assert [p.name for p in (run / paths.BENCHMARK_CAMS).iterdir()] == ["my-notes.png"]
    assert mine.read_bytes() == b"mine"  # only the grids benchmark.json listed went


def test_a_test_set_without_masks_is_explained_on_self_blends_of_its_reals(table):
    run, report = table
    rows = {r["test_set"]: r for r in report["explanations"]}
    assert set(rows) == {"ffpp", "celebdf", "dfdc"}  # every test set gets a row
    for row in rows.values():
        assert (row["method"], row["masks"]) == ("self-blend", "self-blend")
        assert row["n_crops"] >= 2 and row["n_videos"] >= 1
    with open(run / paths.BENCHMARK_EXPLANATIONS, newline="") as f:
        assert {r["masks"] for r in csv.DictReader(f)} == {"self-blend"}


@pytest.mark.parametrize("arch", ["resnet18", "clip_vit_b16"])
def test_every_grad_cam_layer_of_any_backbone_gets_its_rows(masked, tmp_path, arch):
    run = tmp_path / "run"
    save_checkpoint(run / paths.MODEL, build_model(arch, None, "all", 64).eval(),
                    params={"image_size": 64, "trainable": "all", "arch": arch,
                            "weights": None},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
    report = benchmark.run_benchmark(BenchmarkParams(
        run_dir=str(run), test_sets=[str(masked)], num_workers=0, n_bootstrap=50,
        n_explain=5, all_layers=True))
    rows = report["explanations"]
    assert sorted(r["layer"] for r in rows) == ["last", "last-1", "last-2"]
    assert all(r["n_crops"] == 5 and 0 <= r["energy_cam"] <= 1 for r in rows)
    assert all(not np.isnan(r[f"{m}_low"]) for r in rows for m in ("pointing", "deletion"))
