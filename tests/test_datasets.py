"""The published data sets read as laid out by their authors, and their splits: each layout
is built from tiny clips (conftest: names as the real sets use them; FF++'s pairs copied
from its official split files), nothing from ../shared. The table is test_benchmark.py's."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    CANVAS,
    FAST,
    FFPP_SPLITS,
    clip,
    frame_of,
    make_celebdf,
    make_dfdc,
    make_ffpp,
    manifest,
    tree_digest,
)

from dfutils import datasets, faces, paths, shards
from dfutils.benchmark import run_benchmark
from dfutils.model import build_model, save_checkpoint
from dfutils.params import BenchmarkParams, FacesParams, ParameterError, SplitParams
from dfutils.split import split

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


# -- lists that are wrong, malformed or hostile (issue 36) ----------------------------------

def problems_of(listing) -> dict[str, str]:
    return {p["path"]: p["reason"] for p in listing.problems}


def test_a_listed_name_that_leaves_the_folder_is_a_problem_and_nothing_is_written_outside(
        tmp_path):
    """Issue 36, item 1: a DFDC key "../../victim.mp4" was read from outside RAW_DIR and its
    crops written outside FACES_DIR, over a file of the user's; an absolute key gave a bare
    `is not in the subpath of`."""
    root = make_dfdc(tmp_path / "sets" / "DFDC")
    victim = tmp_path / "victim.mp4"
    clip(victim, 40)
    faces_out = tmp_path / "sets" / "faces"
    mine = faces_out.parent / "victim" / "000000.png"  # where the crop of ../../victim landed
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's")
    part = root / "dfdc_train_part_0"
    metadata = json.loads((part / datasets.DFDC_METADATA).read_text())
    metadata["../../victim.mp4"] = {"label": "REAL"}
    metadata[str(victim)] = {"label": "FAKE", "original": "aaa.mp4"}
    (part / datasets.DFDC_METADATA).write_text(json.dumps(metadata))
    listing = datasets.read_dfdc(root)
    problems = problems_of(listing)
    assert "leads outside the data set's folder" in problems[
        "dfdc_train_part_0/metadata.json: ../../victim.mp4"]
    assert "is an absolute path" in problems[f"dfdc_train_part_0/metadata.json: {victim}"]
    assert all("victim" not in i.path for i in listing.items)
    report = faces.extract_faces(FacesParams(raw_dir=str(root), faces_dir=str(faces_out),
                                             dataset="dfdc", **FAST), workers=1)
    assert all("victim" not in e["source"] for e in report["sources"])
    assert mine.read_bytes() == b"the user's"
    assert not [p for p in faces_out.parent.rglob("*.png") if faces_out not in p.parents
                and p != mine]


def test_a_crop_path_outside_the_faces_folder_is_never_made():
    """Issue 36, item 1: checked where crop paths are made, not only in the readers."""
    with pytest.raises(faces.FacesError, match="leads outside"):
        faces.crop_path(datasets.Item("../x.mp4", "real"), "dfdc")
    with pytest.raises(faces.FacesError, match="absolute"):
        faces.crop_path(datasets.Item("/x.mp4", "fake"), "dfdc")


def test_ffpp_split_files_that_disagree_name_both_files(tmp_path):
    """Issue 36, item 4: a pair in train.json and test.json went where the file read last put
    it; a video in two pairs was placed silently. Item 14: ["01"] read as the pair (0, 1)."""
    root = make_ffpp(tmp_path / "ffpp", touch=True)
    splits = root / "splits"
    splits.joinpath("test.json").write_text(json.dumps([["953", "974"], ["071", "054"]]))
    splits.joinpath("val.json").write_text(json.dumps([["720", "672"], ["720", "999"], ["01"]]))
    listing = datasets.read_ffpp(root, compression="c23")
    problems = problems_of(listing)
    assert "[071, 054] in splits/train.json; [071, 054] in splits/test.json" in problems[
        "splits: 071"]
    assert "[720, 672] in splits/val.json; [720, 999] in splits/val.json" in problems[
        "splits: 720"]
    assert "pair 3, ['01'], is not two ids" in problems["splits/val.json"]
    left = {Path(i.path).stem for i in listing.items}
    assert not left & {"071", "054", "071_054", "054_071", "720", "720_672", "672_720"}
    assert {"953", "974", "953_974"} <= left  # the rest is read as before


def test_ffpp_fakes_with_other_names_and_empty_method_folders_are_said(tmp_path):
    """Issue 36, item 14: 000_001_extra.mp4 was taken for a fake of 000 and 001; an empty
    method folder was not said."""
    root = make_ffpp(tmp_path / "ffpp", touch=True)
    extra = root / "manipulated_sequences/Deepfakes/c23/videos/071_054_extra.mp4"
    extra.touch()
    (root / "manipulated_sequences/FaceSwap/c23/videos").mkdir(parents=True)
    listing = datasets.read_ffpp(root, ["Deepfakes", "FaceSwap"])
    problems = problems_of(listing)
    assert "two ids like 071_054" in problems[extra.relative_to(root).as_posix()]
    assert "holds no video" in problems["manipulated_sequences/FaceSwap/c23/videos"]


def test_celebdf_lines_that_climb_out_or_repeat_are_said(tmp_path):
    """Issue 36, item 14: `1 Celeb-real/../Celeb-synthesis/x.mp4` was dropped silently."""
    root = make_celebdf(tmp_path / "celebdf", touch=True)
    with open(root / datasets.CELEBDF_LIST, "a") as f:
        f.write("1 Celeb-real/../Celeb-synthesis/id0_id1_0000.mp4\n1 YouTube-real/00000.mp4\n")
    problems = problems_of(datasets.read_celebdf(root))
    assert "is not `<1|0> <folder>/<video>`" in problems[f"{datasets.CELEBDF_LIST} line 5"]
    assert "listed twice" in problems[f"{datasets.CELEBDF_LIST} line 6"]


def test_malformed_dfdc_entries_are_problems_of_their_own_found_before_any_extraction(tmp_path):
    """Issue 36, item 7: an `original` that is a number crashed in a traceback; a clip listed
    twice in labels.csv failed with SameFileError after the whole extraction."""
    root = make_dfdc(tmp_path / "DFDC")
    part = root / "dfdc_train_part_1"
    metadata = json.loads((part / datasets.DFDC_METADATA).read_text())
    metadata["fff.mp4"]["original"] = 17
    metadata["iii.mp4"]["original"] = ["hhh.mp4"]
    (part / datasets.DFDC_METADATA).write_text(json.dumps(metadata))
    with open(root / "test" / datasets.DFDC_LABELS, "a") as f:
        f.write("t1.mp4,0\nt2.mp4,0\n")  # t1 again, alike; t2 again, as real
    listing = datasets.read_dfdc(root)
    problems = problems_of(listing)
    assert "its `original`, 17, is not a clip's name" in problems["dfdc_train_part_1/fff.mp4"]
    assert "['hhh.mp4']" in problems["dfdc_train_part_1/iii.mp4"]
    assert problems[
        "test/labels.csv line 7"] == "t1.mp4 is listed at line 2 too: the line is left out"
    assert "as fake" in problems["test/labels.csv line 8"]
    tests = {i.path for i in listing.items if i.split == "test"}
    assert "test/t1.mp4" in tests and "test/t2.mp4" not in tests  # both labels: left out


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(b"filename,label\n\xff\xfe.mp4,1\n"), "not UTF-8 text"),
    (lambda f: (f.unlink(), f.mkdir()), "a folder, not a file")])
def test_a_list_that_cannot_be_read_is_named_with_what_to_do(tmp_path, damage, message):
    """Issue 36, item 8: `'utf-8' codec can't decode` and `[Errno 21]` named neither file nor
    fix."""
    root = make_dfdc(tmp_path / "DFDC")
    damage(root / "test" / datasets.DFDC_LABELS)
    problems = problems_of(datasets.read_dfdc(root))
    assert message in problems["test/labels.csv"]


@pytest.mark.parametrize("layout", ["ffpp c40", "empty celebdf"])
def test_nothing_to_read_is_a_failure_that_says_why(tmp_path, layout):
    """Issue 36, item 9: COMPRESSION=c40 with no c40 folders, or a Celeb-DF root with empty
    folders, read 0 sources and ended done without a word of its problems."""
    if layout == "ffpp c40":
        root, params = make_ffpp(tmp_path / "ffpp", touch=True), {"dataset": "ffpp",
                                                                  "compression": "c40"}
    else:
        root, params = tmp_path / "celebdf", {"dataset": "celebdf"}
        for folder in datasets.CELEBDF_FOLDERS:
            (root / folder).mkdir(parents=True)
    with pytest.raises(faces.FacesError, match="holds no photo or clip to crop as dataset=.*: "
                                               ".*(folder missing|missing: without it)"):
        faces.extract_faces(FacesParams(raw_dir=str(root), faces_dir=str(tmp_path / "f"),
                                        **params))
    assert not (tmp_path / "f").exists()


# -- faces and split, end to end -----------------------------------------------------------

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
    from dfutils.manifest import read_manifest

    assert not {s.path for s in read_manifest(tmp_path / "b", "train")
                + read_manifest(tmp_path / "b", "val")} & {
        s.path for s in read_manifest(tmp_path / "b", "test")}  # training never reads test


# -- FF++'s mask videos --------------------------------------------------------------------

def write_mask_clip(path: Path, n: int, shift: int = 0, size: tuple[int, int] = CANVAS) -> None:
    """A mask video like FF++'s: white where frame k of the clips (conftest.frame_of) is
    left of its face box's centre and above its middle (shifted right by `shift` px)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size[::-1])
    for k in range(n):
        _, box = frame_of(k)
        mask = np.zeros((*size, 3), np.uint8)
        mask[:int((box[1] + box[3]) / 2), :int((box[0] + box[2]) / 2) + shift] = 255
        writer.write(mask)
    writer.release()


def extent(white: np.ndarray) -> tuple[float, float]:
    """A top-left white region's right and bottom edges, as shares of the crop's side."""
    columns, rows = np.flatnonzero(white.any(axis=0)), np.flatnonzero(white.any(axis=1))
    assert white[0, 0] and columns[0] == 0 and rows[0] == 0
    return (columns[-1] + 1) / white.shape[1], (rows[-1] + 1) / white.shape[0]


def test_ffpp_mask_videos_are_cropped_with_their_faces_and_carried_to_the_split(tmp_path):
    import csv

    from dfutils.images import load_image

    root = make_ffpp(tmp_path / "FaceForensics++", methods=("Deepfakes", "FaceShifter"))
    masks = root / "manipulated_sequences/Deepfakes/masks/videos"
    names = sorted(p.stem for p in (root / "manipulated_sequences/Deepfakes/c23/videos").iterdir())
    # the test pair's two fakes (953_974, 974_953) get masks in register
    aligned, (shifted, short, small, missing) = names[4:], names[:4]
    for name in aligned:
        write_mask_clip(masks / f"{name}.mp4", 3)
    write_mask_clip(masks / f"{shifted}.mp4", 3, shift=40)  # a mask that is not in register
    write_mask_clip(masks / f"{short}.mp4", 2)
    write_mask_clip(masks / f"{small}.mp4", 3, size=(150, 180))
    faces_dir, data_dir = tmp_path / "faces", tmp_path / "data"
    report = faces.extract_faces(FacesParams(raw_dir=str(root), faces_dir=str(faces_dir),
                                             dataset="ffpp", **FAST), workers=1)

    with open(faces_dir / "faces.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_clip: dict[str, list[dict]] = {}
    for row in rows:
        by_clip.setdefault(Path(row["source"]).stem if "Deepfakes" in row["source"]
                           else row["source"], []).append(row)

    def edges(row: dict) -> tuple[float, float]:  # the mask's right and bottom edges
        white = np.asarray(load_image(faces_dir / row["mask"]).convert("L")) > 127
        assert white.shape == (FAST["face_size"],) * 2
        return extent(white)

    # The face is centred in its crop, so the mask's corner lands near the crop's centre
    # (within 3 of its 48 pixels: dlib's box and the landmarks are not exactly the face's).
    for name in aligned:
        assert len(by_clip[name]) == FAST["frames_per_video"]
        for row in by_clip[name]:
            right, bottom = edges(row)
            assert abs(right - 0.5) < 0.06 and abs(bottom - 0.5) < 0.06, (row["path"], right,
                                                                          bottom)
    for row in by_clip[shifted]:  # 40 source pixels to the right: out of register, and seen
        assert edges(row)[0] > 0.6
    said = {Path(w["source"]).stem: w["reason"] for w in report["without_masks"]}
    assert said[short].startswith(f"its mask video manipulated_sequences/Deepfakes/masks/"
                                  f"videos/{short}.mp4 has 2 frames, fewer than the clip's 3")
    assert "is 180 x 150, the clip 360 x 300: no masks" in said[small]
    assert said[missing].startswith("no mask video manipulated_sequences/Deepfakes/masks/")
    assert set(said) == {short, small, missing}  # FaceShifter publishes none: nothing to say
    for name in (short, small, missing):  # the clip keeps its crops, without masks
        assert by_clip[name] and all(row["mask"] == "" for row in by_clip[name])
    assert not any(row["mask"] for row in rows if "Deepfakes" not in row["source"])
    assert report["n_masks"] == 3 * FAST["frames_per_video"]
    assert any("6 crops masked" in line for line in faces.shown_lines(
        FacesParams(faces_dir=str(faces_dir)), report))

    sharded = tmp_path / "sharded"  # two tasks of a cluster job make the same masks
    for k in range(2):
        faces.extract_faces(FacesParams(raw_dir=str(root), faces_dir=str(sharded),
                                        dataset="ffpp", **FAST), workers=1,
                            shard=shards.Shard(k, 2))
    faces.merge_faces(FacesParams(raw_dir=str(root), faces_dir=str(sharded), dataset="ffpp",
                                  **FAST))
    def contents(root: Path) -> dict[str, str]:
        return {name: digest.split(":")[0] for name, digest in tree_digest(root).items()}
    assert contents(sharded) == contents(faces_dir)

    split(SplitParams(raw_dir=str(faces_dir), data_dir=str(data_dir), group_by="folder"))
    carried = {row["source"]: row["mask"] for row in manifest(data_dir)}
    for row in rows:  # the split's mask of each crop is the faces step's, byte for byte
        if row["mask"]:
            assert (data_dir / carried[row["path"]]).read_bytes() == (
                faces_dir / row["mask"]).read_bytes()
        else:
            assert carried[row["path"]] == ""
    with open(data_dir / "faces.csv", newline="") as f:
        assert {r["path"]: r["mask"] for r in csv.DictReader(f)} == {
            r["path"]: r["mask"] for r in manifest(data_dir)}

    # The benchmark explains the test fakes that have a mask, per method, and runs on
    # although some clips have none (FaceShifter's, and those said above).
    run = tmp_path / "run"
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 48, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    report = run_benchmark(BenchmarkParams(run_dir=str(run), test_sets=[str(data_dir)],
                                           num_workers=0, n_bootstrap=50))
    (row,) = report["explanations"]
    assert (row["method"], row["masks"], row["n_crops"], row["n_videos"]) == (
        "Deepfakes", "mask", 2 * FAST["frames_per_video"], 2)
    assert row["note"].startswith("only 2 to resample")  # two clips give no interval
    assert 0 <= row["pointing_cam"] <= 1 and row["pointing_verdict"] == ""
