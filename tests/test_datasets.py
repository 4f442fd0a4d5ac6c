"""The published data sets read as laid out by their authors, their splits, and the
cross-dataset table: each layout is built here from tiny clips (names as the real sets use
them; FF++'s pairs copied from its official split files), nothing from ../shared."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tree_digest, write_clip
from sklearn.metrics import roc_auc_score

from dfutils import benchmark, datasets, faces, files
from dfutils.metrics import bootstrap_auc
from dfutils.model import build_model, save_checkpoint
from dfutils.params import BenchmarkParams, FacesParams, ParameterError, SplitParams
from dfutils.split import split

# Three pairs of ondyari/FaceForensics dataset/splits/{train,val,test}.json.
FFPP_SPLITS = {"train": [["071", "054"]], "val": [["720", "672"]], "test": [["953", "974"]]}
FAST = {"frames_per_video": 2, "face_size": 48}


def clip(path: Path, shade: int, n: int = 3, face: bool = True) -> None:
    """A short clip of the moving face on a background of grey `shade` (any int)."""
    write_clip(path, n, face=face, shade=shade % 230)


def make_ffpp(root: Path, methods=("Deepfakes", "Face2Face"), touch: bool = False) -> Path:
    """FF++ c23: the originals and both fakes of each pair, per method; `touch`: empty files
    (enough for the reader), else real clips."""
    write = (lambda p, shade: (p.parent.mkdir(parents=True, exist_ok=True), p.touch())
             ) if touch else clip
    (root / "splits").mkdir(parents=True)
    for split_name, pairs in FFPP_SPLITS.items():
        (root / "splits" / f"{split_name}.json").write_text(json.dumps(pairs))
    shade = 20
    for a, b in [pair for pairs in FFPP_SPLITS.values() for pair in pairs]:
        for name in (a, b):
            write(root / f"original_sequences/youtube/c23/videos/{name}.mp4", shade := shade + 9)
        for method in methods:
            for name in (f"{a}_{b}", f"{b}_{a}"):
                write(root / f"manipulated_sequences/{method}/c23/videos/{name}.mp4",
                      shade := shade + 9)
    return root


def make_celebdf(root: Path, touch: bool = False) -> Path:
    """Celeb-DF v2: six identities, a ring of swaps, three YouTube clips, the test list
    (1 = real) with one line that contradicts its folder."""
    write = (lambda p, shade: (p.parent.mkdir(parents=True, exist_ok=True), p.touch())
             ) if touch else clip
    shade = 20
    for k in range(6):
        write(root / f"Celeb-real/id{k}_0000.mp4", shade := shade + 9)
        write(root / f"Celeb-synthesis/id{k}_id{(k + 1) % 6}_0000.mp4", shade := shade + 9)
    for k in range(3):
        write(root / f"YouTube-real/{k:05d}.mp4", shade := shade + 9)
    (root / datasets.CELEBDF_LIST).write_text(
        "1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id5_id0_0000.mp4\n"
        "1 Celeb-real/id5_0000.mp4\n0 Celeb-real/id4_0000.mp4\n")
    return root


def make_dfdc(root: Path) -> Path:
    """Two training parts (fakes with their originals, one original missing) and the
    public test set's labels.csv (1 = fake) with a clip that shows no face."""
    parts = {"dfdc_train_part_0": {"aaa.mp4": {"label": "REAL", "split": "train"},
                                   "bbb.mp4": {"label": "FAKE", "original": "aaa.mp4"},
                                   "ccc.mp4": {"label": "REAL"},
                                   "ddd.mp4": {"label": "FAKE", "original": "ccc.mp4"}},
             "dfdc_train_part_1": {"eee.mp4": {"label": "REAL"},
                                   "fff.mp4": {"label": "FAKE", "original": "eee.mp4"},
                                   "ggg.mp4": {"label": "FAKE", "original": "zzz.mp4"},
                                   "hhh.mp4": {"label": "REAL"},
                                   "iii.mp4": {"label": "FAKE", "original": "hhh.mp4"}}}
    shade = 20
    for part, metadata in parts.items():
        (root / part).mkdir(parents=True)
        (root / part / datasets.DFDC_METADATA).write_text(json.dumps(metadata))
        for name in metadata:
            clip(root / part / name, shade := shade + 9)
    (root / "test").mkdir()
    (root / "test" / datasets.DFDC_LABELS).write_text(
        "filename,label\nt1.mp4,0\nt2.mp4,1\nt3.mp4,1\nt4.mp4,0\nmissing.mp4,1\n")
    for name in ("t1", "t2", "t4"):
        clip(root / "test" / f"{name}.mp4", shade := shade + 9)
    clip(root / "test" / "t3.mp4", 0, face=False)  # a fake test video without a face
    return root


# -- the readers ---------------------------------------------------------------------------

def test_ffpp_pairs_own_their_originals_and_both_fakes(tmp_path):
    root = make_ffpp(tmp_path / "ffpp", touch=True)
    listing = datasets.read_ffpp(root, compression="c23")
    assert listing.problems == []
    by_path = {Path(i.path).stem + ":" + i.method: i for i in listing.items}
    for split_name, [[a, b]] in FFPP_SPLITS.items():
        owned = [by_path[f"{a}:"], by_path[f"{b}:"]] + [
            by_path[f"{x}:{m}"] for x in (f"{a}_{b}", f"{b}_{a}")
            for m in ("Deepfakes", "Face2Face")]
        assert {i.split for i in owned} == {split_name}
    assert {i.method for i in listing.items if i.label == "fake"} == {"Deepfakes", "Face2Face"}
    assert by_path["071_054:Deepfakes"].keys == ("ffpp:071", "ffpp:054")
    only = datasets.read_ffpp(root, ["Face2Face"])
    assert {i.method for i in only.items} == {"", "Face2Face"}


def test_an_incomplete_ffpp_reports_each_missing_thing_and_reads_the_rest(tmp_path):
    root = make_ffpp(tmp_path / "ffpp", touch=True)
    (root / "original_sequences/youtube/c23/videos/953.mp4").unlink()
    (root / "manipulated_sequences/Deepfakes/c23/videos/999_998.mp4").touch()  # in no pair
    listing = datasets.read_ffpp(root, ["Deepfakes", "FaceShifter"])
    problems = {p["path"]: p["reason"] for p in listing.problems}
    assert "listed in splits/test.json but missing" in problems[
        "original_sequences/youtube/c23/videos/953.mp4"]
    assert "its original 953 is missing" in problems[
        "manipulated_sequences/Deepfakes/c23/videos/953_974.mp4"]
    assert "not a pair" in problems["manipulated_sequences/Deepfakes/c23/videos/999_998.mp4"]
    assert "folder missing" in problems["manipulated_sequences/FaceShifter/c23/videos"]
    assert len([i for i in listing.items if i.label == "fake"]) == 6  # the rest is read


def test_celebdf_reads_1_as_real_and_reports_a_line_that_contradicts_its_folder(tmp_path):
    listing = datasets.read_celebdf(make_celebdf(tmp_path / "celebdf", touch=True))
    by_path = {i.path: i for i in listing.items}
    assert by_path["YouTube-real/00000.mp4"].label == "real"
    assert by_path["YouTube-real/00000.mp4"].split == "test"
    assert by_path["Celeb-synthesis/id5_id0_0000.mp4"].label == "fake"
    assert by_path["Celeb-synthesis/id5_id0_0000.mp4"].split == "test"
    assert by_path["Celeb-synthesis/id1_id2_0000.mp4"].keys == ("celebdf:id1", "celebdf:id2")
    assert "Celeb-real/id4_0000.mp4" not in by_path  # contradicted: left out, and said
    [problem] = listing.problems
    assert problem["path"] == f"{datasets.CELEBDF_LIST} line 4"
    assert "says 0 (fake) but Celeb-real/id4_0000.mp4 is in Celeb-real" in problem["reason"]


def test_dfd_is_a_test_only_set(tmp_path):
    root = tmp_path / "dfd"
    for rel in ("original_sequences/actors/c23/videos/01__exit_phone_room.mp4",
                "manipulated_sequences/DeepFakeDetection/c23/videos/"
                "01_02__exit_phone_room__YVGY8LOK.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    listing = datasets.read_dfd(root)
    assert [(i.label, i.split, i.keys) for i in listing.items] == [
        ("real", "test", ("dfd:01",)), ("fake", "test", ("dfd:01", "dfd:02"))]


def test_faces_parameters_name_a_method_or_data_set_that_does_not_exist():
    with pytest.raises(ParameterError, match="'Deepfake' is not an FF\\+\\+ manipulation"):
        FacesParams(dataset="ffpp", methods="Deepfake")
    with pytest.raises(ParameterError, match="methods applies to dataset=ffpp only"):
        FacesParams(dataset="celebdf", methods="Deepfakes")
    with pytest.raises(ParameterError, match="'ff\\+\\+'"):
        FacesParams(dataset="ff++")


# -- faces and split, end to end -----------------------------------------------------------

def prepare(tmp_path: Path, name: str, raw: Path, dataset: str, **split_values
            ) -> tuple[Path, dict, dict]:
    """The faces step and the split of one data set: (split folder, faces report, split
    report); the data set's folder is only read."""
    before = tree_digest(raw)
    faces_dir, data_dir = tmp_path / f"{name}-faces", tmp_path / name
    face_report = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(faces_dir),
                                                  dataset=dataset, **FAST), workers=1)
    report = split(SplitParams(raw_dir=str(faces_dir), data_dir=str(data_dir),
                               group_by="folder", **split_values))
    assert tree_digest(raw) == before
    return data_dir, face_report, report


def manifest(data_dir: Path) -> list[dict]:
    with open(data_dir / files.MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    root = tmp_path_factory.mktemp("sets")
    return {
        "ffpp": prepare(root, "ffpp", make_ffpp(root / "FaceForensics++"), "ffpp"),
        "celebdf": prepare(root, "celebdf", make_celebdf(root / "Celeb-DF-v2"), "celebdf",
                           val_fraction=0.34),
        "dfdc": prepare(root, "dfdc", make_dfdc(root / "DFDC"), "dfdc", val_fraction=0.4),
    }


def test_ffpp_crops_keep_their_pairs_split_and_method(prepared):
    data_dir, face_report, report = prepared["ffpp"]
    rows = manifest(data_dir)
    pair_split = {name: s for s, [[a, b]] in FFPP_SPLITS.items() for name in (a, b)}
    for row in rows:
        ids = Path(row["video"]).stem.split("_")
        assert {pair_split[i] for i in ids} == {row["split"]}, row["video"]
    assert {r["method"] for r in rows} == {"", "Deepfakes", "Face2Face"}
    assert report["by_method"]["test"]["Deepfakes"] == {"clips": 2, "crops": 4}
    assert report["by_method"]["test"]["real"] == {"clips": 2, "crops": 4}
    assert "splits/test.json" in report["rules"]["test"]
    assert face_report["dataset"]["name"] == "ffpp"


def test_celebdf_identities_never_straddle_train_and_val(prepared):
    data_dir, face_report, report = prepared["celebdf"]
    rows = manifest(data_dir)
    sides: dict[str, set[str]] = {}
    for row in rows:
        if row["split"] != "test":
            for key in row["group"].split("|"):
                sides.setdefault(key, set()).add(row["split"])
    assert sides and all(len(s) == 1 for s in sides.values()), sides
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    tested = {r["video"] for r in rows if r["split"] == "test"}
    assert tested == {"YouTube-real/00000.mp4", "Celeb-synthesis/id5_id0_0000.mp4",
                      "Celeb-real/id5_0000.mp4"}
    # the ring of swaps joins neighbours: the swaps across the train/val border are left
    # out, by name, never put on one side
    assert report["left_out"] and all("fell on both sides" in r["reason"]
                                      for r in report["left_out"])
    left = {Path(r["path"]).parent.name for r in report["left_out"]}
    assert not left & {Path(r["video"]).stem for r in rows}
    assert any("line 4" in p["source"] for p in face_report["skipped"])


def test_dfdc_fakes_stay_with_their_originals_and_the_public_test_set_is_test(prepared):
    data_dir, face_report, report = prepared["dfdc"]
    rows = manifest(data_dir)
    split_of = {Path(r["video"]).name: r["split"] for r in rows}
    for fake, original in (("bbb", "aaa"), ("ddd", "ccc"), ("fff", "eee"), ("iii", "hhh")):
        assert split_of[f"{fake}.mp4"] == split_of[f"{original}.mp4"] != "test"
    assert {n for n, s in split_of.items() if s == "test"} == {"t1.mp4", "t2.mp4", "t4.mp4"}
    problems = {p["source"]: p["reason"] for p in face_report["skipped"]}
    assert "original zzz.mp4 is in no metadata.json" in problems[
        "dfdc_train_part_1/ggg.mp4"]
    assert problems["test/missing.mp4"] == "listed in test/labels.csv but missing"
    assert report["faceless"] == [{"source": "test/t3.mp4", "label": "fake", "split": "test",
                                   "method": "", "why": "no face in any frame read"}]


def test_a_folder_split_gets_a_test_split_only_when_asked(tmp_path):
    from conftest import make_raw

    raw = make_raw(tmp_path / "raw", 10, 10)
    plain = split(SplitParams(raw_dir=str(raw), data_dir=str(tmp_path / "a")))
    assert set(plain["counts"]) == {"train", "val"}  # as before test existed
    with_test = split(SplitParams(raw_dir=str(raw), data_dir=str(tmp_path / "b"),
                                  test_fraction=0.2))
    assert with_test["counts"] == {"train": {"real": 6, "fake": 6}, "val": {"real": 2, "fake": 2},
                                   "test": {"real": 2, "fake": 2}}
    rows = {r["source"]: r["split"] for r in manifest(tmp_path / "b")}
    old = {r["source"]: r["split"] for r in manifest(tmp_path / "a")}
    assert {s for s, v in old.items() if v == "val"} & {s for s, v in rows.items()
                                                        if v == "test"}  # same ranking
    from dfutils.data import read_manifest

    assert not {s.path for s in read_manifest(tmp_path / "b", "train")
                + read_manifest(tmp_path / "b", "val")} & {
        s.path for s in read_manifest(tmp_path / "b", "test")}  # training never reads test


# -- the table -----------------------------------------------------------------------------

def test_the_sbi_rule_takes_the_top_face_among_the_large_ones_per_frame():
    # frame 0: a large face at 0.2 and a small one (under half its size) at 0.9
    assert benchmark.sbi_video_score([0, 0, 1], [100, 40, 100], [0.2, 0.9, 0.6]) == \
        pytest.approx((0.2 + 0.6) / 2)
    # two large faces in one frame: the higher counts
    assert benchmark.sbi_video_score([0, 0], [100, 60], [0.2, 0.9]) == pytest.approx(0.9)


def test_the_cluster_bootstrap_is_wider_than_counting_each_frame_as_independent():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1] * 10, 8)
    scores = np.repeat(rng.uniform(0, 1, 20) + np.tile([0, 0.3], 10), 8)  # frames = video
    videos = np.repeat(np.arange(20), 8)
    auc = roc_auc_score(labels, scores)
    by_video = bootstrap_auc(labels, scores, videos, 400)
    by_frame = bootstrap_auc(labels, scores, None, 400)
    assert by_video[0] <= auc <= by_video[1]
    assert by_video[1] - by_video[0] > 1.5 * (by_frame[1] - by_frame[0])


@pytest.fixture(scope="module")
def table(prepared, tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("bench") / "run"
    save_checkpoint(run / files.MODEL, build_model(None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    report = benchmark.run_benchmark(BenchmarkParams(
        run_dir=str(run), test_sets=[str(prepared[n][0]) for n in ("ffpp", "celebdf", "dfdc")],
        num_workers=0, n_bootstrap=50))
    return run, report


def test_the_table_has_frame_and_video_rows_per_test_set_and_method(table):
    run, report = table
    with open(run / files.BENCHMARK, newline="") as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["test_set"], r["method"], r["level"], r["rule"]) for r in rows}
    for method in ("all", "Deepfakes", "Face2Face"):
        for level, rule in benchmark.LEVELS:
            assert ("ffpp", method, level, rule) in kinds
    assert {("celebdf", "all"), ("dfdc", "all")} <= {(t, m) for t, m, _, _ in kinds}
    assert all((run / name).is_file() for name in (
        files.BENCHMARK_JSON, files.BENCHMARK_FIGURE, files.BENCHMARK_VIDEOS,
        files.BENCHMARK_FRAMES))
    assert set(report["headline"]) == {"ffpp", "celebdf", "dfdc"}


def test_the_tables_numbers_are_those_of_the_scores_it_writes(table):
    run, report = table
    with open(run / files.BENCHMARK_FRAMES, newline="") as f:
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
    with open(run / files.BENCHMARK_VIDEOS, newline="") as f:
        [t3] = [r for r in csv.DictReader(f) if r["video"] == "test/t3.mp4"]
    assert (t3["n_frames"], t3["p_fake_mean"], t3["p_fake_sbi"]) == ("0", "", "0.500000")


def test_a_split_without_a_test_split_is_refused_by_name(table, prepared, tmp_path):
    from conftest import make_raw

    run, _ = table
    make_raw(tmp_path / "raw", 3, 3)
    split(SplitParams(raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "plain")))
    with pytest.raises(ValueError, match=f"the split in {tmp_path / 'plain'} has no test"):
        benchmark.run_benchmark(BenchmarkParams(run_dir=str(run),
                                                test_sets=[str(tmp_path / "plain")]))


def test_make_benchmark_needs_a_trained_run_and_names_it(tmp_path):
    from dfutils import pipeline

    with pytest.raises(pipeline.ChainError, match="model.pt not found: RUN=<name> must name"):
        pipeline.run_all("untrained", overrides={"test_sets": str(tmp_path)},
                         steps=["05-benchmark"], runs_root=tmp_path / "runs", replace_run=True)
    assert not (tmp_path / "runs" / "untrained").exists()
    trained = tmp_path / "runs" / "trained"
    save_checkpoint(trained / files.MODEL, build_model(None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    (trained / files.RUN_RECORD).write_text("{}")
    with pytest.raises(pipeline.ChainError, match="nowhere holds no manifest.csv: name split"):
        pipeline.run_all("trained", overrides={"test_sets": str(tmp_path / "nowhere")},
                         steps=["05-benchmark"], runs_root=tmp_path / "runs", replace_run=True)
    assert sorted(p.name for p in trained.iterdir()) == [files.MODEL, files.RUN_RECORD]
    assert pipeline.choose_steps(None, None, {"test_sets": "x"}, faces=False)[-1] == \
        "05-benchmark"
