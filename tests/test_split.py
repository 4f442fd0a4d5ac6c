import csv
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_raw, make_split, tree_digest, write_image
from PIL import Image

from dfutils.split import SplitError, n_val


def manifest(data_dir: Path) -> list[dict]:
    with open(data_dir / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def assignment(data_dir: Path) -> dict[str, str]:
    return {r["source"]: r["split"] for r in manifest(data_dir)}


@pytest.mark.parametrize("n_real,n_fake,fraction", [(10, 10, 0.2), (25, 7, 0.2), (3, 40, 0.5),
                                                     (2, 2, 0.2), (50, 50, 0.1)])
def test_each_class_gets_its_validation_share(tmp_path, n_real, n_fake, fraction):
    make_raw(tmp_path / "raw", n_real, n_fake)
    report = make_split(tmp_path / "raw", tmp_path / "data", val_fraction=fraction)
    for label, n in (("real", n_real), ("fake", n_fake)):
        expected = min(n - 1, max(1, int(n * fraction + 0.5)))
        assert report["counts"]["val"][label] == expected
        assert report["counts"]["train"][label] == n - expected
        assert len(list((tmp_path / "data" / "val" / label).iterdir())) == expected
    rows = manifest(tmp_path / "data")
    assert len(rows) == n_real + n_fake
    assert all((tmp_path / "data" / r["path"]).is_file() for r in rows)
    assert all(r["path"].split("/")[:2] == [r["split"], r["label"]] for r in rows)


def test_n_val_rounds_and_keeps_one_image_in_each_split():
    assert [n_val(n, 0.2) for n in (2, 3, 5, 7, 8, 1100)] == [1, 1, 1, 1, 2, 220]
    assert n_val(2, 0.9) == 1


def test_same_split_whatever_the_file_order_and_location(tmp_path):
    make_raw(tmp_path / "a", 30, 30)
    # The same files, copied in shuffled order under other names: the split follows content.
    files = sorted((tmp_path / "a").rglob("*.png"))
    random.Random(1).shuffle(files)
    for i, f in enumerate(files):
        dest = tmp_path / "b" / f.parent.name / f"x{i:03d}_{f.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    make_split(tmp_path / "a", tmp_path / "da", seed=3)
    make_split(tmp_path / "b", tmp_path / "db", seed=3)
    by_hash_a = {r["sha256"]: r["split"] for r in manifest(tmp_path / "da")}
    by_hash_b = {r["sha256"]: r["split"] for r in manifest(tmp_path / "db")}
    assert by_hash_a == by_hash_b
    make_split(tmp_path / "a", tmp_path / "dc", seed=4)
    assert {r["sha256"]: r["split"] for r in manifest(tmp_path / "dc")} != by_hash_a


@pytest.mark.parametrize("n", [9, 10, 11, 24, 37])
def test_adding_one_file_moves_at_most_one_other(tmp_path, n):
    make_raw(tmp_path / "raw", n, n)
    make_split(tmp_path / "raw", tmp_path / "d1")
    before = assignment(tmp_path / "d1")
    write_image(tmp_path / "raw" / "real" / "new.png", seed=99_999)
    make_split(tmp_path / "raw", tmp_path / "d2")
    after = assignment(tmp_path / "d2")
    moved = [k for k in before if before[k] != after[k]]
    assert len(moved) <= 1
    assert all(k.startswith("real/") for k in moved)


def test_duplicates_stay_together_and_conflicts_are_excluded(tmp_path):
    raw = make_raw(tmp_path / "raw", 12, 12)
    shutil.copy(raw / "real" / "r000.png", raw / "real" / "copy_of_r000.png")
    (raw / "real" / "sub").mkdir()
    shutil.copy(raw / "real" / "r000.png", raw / "real" / "sub" / "r000.png")
    shutil.copy(raw / "fake" / "f001.png", raw / "real" / "mislabelled.png")
    report = make_split(raw, tmp_path / "data")
    rows = {r["source"]: r for r in manifest(tmp_path / "data")}
    group = ["real/copy_of_r000.png", "real/r000.png", "real/sub/r000.png"]
    assert len({rows[p]["split"] for p in group}) == 1
    assert [d["paths"] for d in report["duplicates"]] == [group]
    assert report["conflicts"] == [{"sha256": report["conflicts"][0]["sha256"],
                                    "paths": ["fake/f001.png", "real/mislabelled.png"]}]
    assert "fake/f001.png" not in rows and "real/mislabelled.png" not in rows
    # colliding names from different subfolders stay distinct files
    assert len({rows[p]["path"] for p in group}) == 3


def _corrupt(raw: Path) -> dict[str, str]:
    """Bad files of each kind, and the words their reason must contain."""
    (raw / "real" / "empty.jpg").write_bytes(b"")
    good = (raw / "real" / "r000.png").read_bytes()
    (raw / "real" / "truncated.png").write_bytes(good[: len(good) // 2])
    write_image(raw / "fake" / "cut.jpg", seed=5, size=64, fmt="JPEG")
    data = (raw / "fake" / "cut.jpg").read_bytes()
    (raw / "fake" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (raw / "fake" / "notes.JPG").write_text("this is not a picture")
    # a valid PNG header and chunk layout with scrambled compressed pixel data
    scrambled = bytearray(good)
    middle = len(good) // 2
    scrambled[middle:middle + 64] = os.urandom(64)
    (raw / "fake" / "garbage.png").write_bytes(bytes(scrambled))
    (raw / "real" / "readme.txt").write_text("hello")
    (raw / "real" / ".DS_Store").write_bytes(b"\0\0")
    return {"real/empty.jpg": "empty", "real/truncated.png": "truncated",
            "fake/cut.jpg": "truncated", "fake/notes.JPG": "not an image",
            "fake/garbage.png": "corrupt"}


def test_bad_files_are_rejected_by_name_with_the_reason(tmp_path):
    raw = make_raw(tmp_path / "raw", 6, 6)
    expected = _corrupt(raw)
    report = make_split(raw, tmp_path / "data")
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(rejected) == set(expected)
    for path, words in expected.items():
        assert words in rejected[path], (path, rejected[path])
    skipped = {r["path"] for r in report["skipped"]}
    assert skipped == {"real/readme.txt", "real/.DS_Store"}
    assert report["n_images"] == 12


def test_unusual_but_valid_images_are_accepted(tmp_path):
    raw = make_raw(tmp_path / "raw", 3, 3)
    write_image(raw / "real" / "grey.png", seed=1, mode="L")
    write_image(raw / "real" / "alpha.PNG", seed=2, mode="RGBA")
    write_image(raw / "real" / "palette.png", seed=3, mode="P")
    Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).save(
        raw / "fake" / "sixteen.png")
    rotated = Image.fromarray(np.zeros((20, 40, 3), np.uint8) + 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    rotated.save(raw / "fake" / "rotated.jpeg", exif=exif)
    report = make_split(raw, tmp_path / "data")
    assert report["rejected"] == []
    rows = {r["source"]: r for r in manifest(tmp_path / "data")}
    assert {"real/grey.png", "real/alpha.PNG", "real/palette.png", "fake/sixteen.png",
            "fake/rotated.jpeg"} <= set(rows)
    assert (rows["fake/rotated.jpeg"]["width"], rows["fake/rotated.jpeg"]["height"]) == ("20", "40")


def test_raw_folder_is_left_byte_for_byte_unchanged(tmp_path):
    raw = make_raw(tmp_path / "raw", 8, 8)
    _corrupt(raw)
    before = tree_digest(raw)
    make_split(raw, tmp_path / "data")
    make_split(raw, tmp_path / "data", val_fraction=0.5, overwrite=True)
    shutil.rmtree(tmp_path / "data")
    assert tree_digest(raw) == before


def test_rerun_changes_nothing_and_other_parameters_need_overwrite(tmp_path, raw):
    data = tmp_path / "data"
    make_split(raw, data)
    (data / "README.md").write_text("mine")
    before = tree_digest(data)
    make_split(raw, data)
    assert tree_digest(data) == before
    with pytest.raises(SplitError, match="overwrite=True"):
        make_split(raw, data, seed=7)
    assert tree_digest(data) == before
    report = make_split(raw, data, seed=7, overwrite=True)
    assert report["params"]["seed"] == 7
    assert json.loads((data / "split_report.json").read_text())["params"]["seed"] == 7
    assert (data / "README.md").read_text() == "mine"  # not the split's: left alone
    assert not (data / ".split-tmp").exists() and not (data / ".split-old").exists()


def test_an_interrupted_rebuild_leaves_the_old_split(tmp_path, raw, monkeypatch):
    data = tmp_path / "data"
    make_split(raw, data)
    before = tree_digest(data)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dfutils.split.write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        make_split(raw, data, seed=9, overwrite=True)
    assert tree_digest(data) == before


@pytest.mark.parametrize("setup,message", [
    (lambda raw: shutil.rmtree(raw), "does not exist"),
    (lambda raw: shutil.rmtree(raw / "fake"), "fake is missing"),
    (lambda raw: [p.unlink() for p in (raw / "real").iterdir()], "holds no .jpeg, .jpg or .png"),
    (lambda raw: [p.unlink() for p in sorted((raw / "real").iterdir())[1:]], "at least two"),
])
def test_unusable_raw_folders_stop_with_a_message_naming_them(tmp_path, raw, setup, message):
    setup(raw)
    with pytest.raises(SplitError, match=message):
        make_split(raw, tmp_path / "data")
    assert not (tmp_path / "data" / "manifest.csv").exists()


def test_masks_are_found_and_not_split_as_images(tmp_path, raw):
    write_image(raw / "fake" / "f000_mask.png", seed=1, mode="L")
    write_image(raw / "fake" / "masks" / "f001.png", seed=2, mode="L")
    report = make_split(raw, tmp_path / "data")
    rows = {r["source"]: r for r in manifest(tmp_path / "data")}
    assert "fake/f000_mask.png" not in rows and "fake/masks/f001.png" not in rows
    assert rows["fake/f000.png"]["mask"] and rows["fake/f001.png"]["mask"]
    assert (tmp_path / "data" / rows["fake/f001.png"]["mask"]).is_file()
    assert report["n_masks"] == 2


def test_worker_processes_give_the_same_result_as_one_process(tmp_path):
    from dfutils.split import inspect_all, scan

    raw = make_raw(tmp_path / "raw", 150, 150, size=8)  # enough files for the process pool
    (raw / "fake" / "broken.png").write_bytes(b"")
    candidates, _ = scan(raw)
    assert inspect_all(raw, candidates, workers=2) == inspect_all(raw, candidates, workers=1)


def _scene_splits(data_dir: Path) -> dict[str, set]:
    found: dict[str, set] = {}
    for row in manifest(data_dir):
        found.setdefault(row["source"].split("/")[1].split("_")[0], set()).add(row["split"])
    return found


def test_a_group_pattern_keeps_both_clips_of_a_scene_in_one_split(tmp_path):
    root = tmp_path / "raw"
    for scene in range(12):  # a real clip and its face-swapped twin per scene
        for label, side in (("real", "left"), ("fake", "right")):
            for i in range(2):
                write_image(root / label / f"s{scene}_{side}" / f"{i}.png",
                            seed=scene * 10 + i + (5000 if label == "fake" else 0))
    report = make_split(root, tmp_path / "paired", group_by="folder", group_pattern=r"^(s\d+)_",
                   seed=0)
    assert all(len(s) == 1 for s in _scene_splits(tmp_path / "paired").values())
    assert report["group_counts"]["val"] == {"real": 2, "fake": 2}  # 12 scenes, 20 %
    assert report["params"]["group_pattern"] == r"^(s\d+)_"
    assert report["group_pattern"] == {"pattern": r"^(s\d+)_", "paths": 48, "matched": 48,
                                       "unmatched": 0, "keys": 12}  # what it did
    rows = manifest(tmp_path / "paired")  # the video is the clip, not the pair of clips
    assert all(r["video"] == r["source"].rsplit("/", 1)[0] for r in rows)
    assert len({r["video"] for r in rows}) == 24 and len({r["group"] for r in rows}) == 12
    make_split(root, tmp_path / "apart", group_by="folder", seed=0)  # the leak it prevents
    assert any(len(s) == 2 for s in _scene_splits(tmp_path / "apart").values())


@pytest.mark.parametrize("pattern,words", [
    ("(x)?", "matches none of the 16 paths"),  # its group takes no part: was a TypeError
    ("zzz", "matches none of the 16 paths"),
    ("^", "gives every one of the 16 paths the same key ''"),
    ("^(a+)+b", "took more than 1 s on 16 paths and was stopped"),
])
def test_a_useless_or_runaway_group_pattern_is_refused_by_name(tmp_path, monkeypatch, pattern,
                                                               words):
    """Issue 26, item 5: `(x)?` crashed, `^` and `zzz` changed or disabled grouping without
    a word, and catastrophic backtracking hung at 100 % CPU."""
    from dfutils import split

    monkeypatch.setattr(split, "PATTERN_SECONDS", 1.0)
    root = tmp_path / "raw"
    for label in ("real", "fake"):
        for i in range(8):
            write_image(root / label / f"{'a' * 40}{i}.png", seed=i + (100 if label == "fake"
                                                                      else 0))
    with pytest.raises(split.SplitError, match=re.escape(f"group_pattern {pattern!r} {words}")):
        make_split(root, tmp_path / "data", group_pattern=pattern)
    assert not (tmp_path / "data").exists()


def test_a_group_pattern_must_be_a_regular_expression():
    from dfutils.params import ParameterError, SplitParams

    with pytest.raises(ParameterError, match="not a regular expression"):
        SplitParams(group_pattern="(unclosed")


def test_a_test_split_is_read_but_never_trained_or_selected_on(tmp_path, raw, run_dir):
    """The seam for the data sets' official test lists: rows with split=test are read by
    read_manifest and evaluate, and by nothing that trains or chooses a threshold."""
    import csv

    from conftest import evaluate

    from dfutils.data import train_val_loaders
    from dfutils.manifest import read_manifest
    from dfutils.params import TrainParams

    data = tmp_path / "data"
    make_split(raw, data, val_fraction=0.3)
    assert read_manifest(data, "test") == []  # a plain raw folder has no test list
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[:2] + rows[-2:]:  # two reals and two fakes move to test
        moved = row["path"].replace(f"{row['split']}/", "test/", 1)
        (data / moved).parent.mkdir(parents=True, exist_ok=True)
        (data / row["path"]).rename(data / moved)
        row.update(path=moved, split="test")
    with open(data / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    test = {s.path for s in read_manifest(data, "test")}
    assert len(test) == 4
    train, val = train_val_loaders(TrainParams(data_dir=str(data), num_workers=0))
    assert not test & {s.path for s in train.dataset.samples + val.dataset.samples}
    report, _ = evaluate(run_dir, data, "", split="test", batch_size=4, sweeps={"jpeg": (100,)})
    assert report["n_images"] == 4 and report["name"] == "data-test"
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        read_manifest(data, "holdout")


def test_linked_folders_are_followed_and_a_loop_is_named(tmp_path):
    """Issue 26, item 11: a linked folder inside a class folder was ignored without a word
    (and the split then said the class held no images)."""
    raw = tmp_path / "raw"
    make_raw(tmp_path / "elsewhere", 4, 4)
    (raw / "real").mkdir(parents=True)
    (raw / "fake").mkdir()
    (raw / "real" / "linked").symlink_to(tmp_path / "elsewhere" / "real")
    (raw / "fake" / "linked").symlink_to(tmp_path / "elsewhere" / "fake")
    (raw / "fake" / "loop").symlink_to(raw / "fake")
    report = make_split(raw, tmp_path / "data", val_fraction=0.25)
    assert report["counts"]["train"]["real"] + report["counts"]["val"]["real"] == 4
    assert report["counts"]["train"]["fake"] + report["counts"]["val"]["fake"] == 4
    (skipped,) = report["skipped"]
    assert skipped["path"] == "fake/loop" and "a folder already read" in skipped["reason"]


@pytest.mark.parametrize("target", ["..", "../fake"])
def test_a_link_back_to_the_raw_folder_or_the_other_class_is_skipped_not_mixed(tmp_path,
                                                                              target):
    """Issue 36, item 17: real/loop -> .. brought every fake into real/ too: each fake became
    a label conflict and the split failed, blaming the user's images."""
    raw = make_raw(tmp_path / "raw", 4, 4)
    (raw / "real" / "loop").symlink_to(target)
    report = make_split(raw, tmp_path / "data", val_fraction=0.25)
    assert report["conflicts"] == []
    assert sum(report["counts"][s]["real"] for s in report["counts"]) == 4
    (skipped,) = report["skipped"]
    assert skipped["path"] == "real/loop" and "(the classes would mix): not followed" in (
        skipped["reason"])


def test_a_combined_split_can_take_each_share_from_each_source_folder(tmp_path):
    """A split of two data sets, one of many single images and one of few large clips:
    by class alone, the clips' share of validation is left to chance (the DeepFaceLive
    clips beside 1,100 FFHQ/StyleGAN photos got 1 of 22 scenes); stratify=source takes
    val_fraction of each source folder's groups in each class."""
    root = tmp_path / "raw"
    for label, offset in (("real", 0), ("fake", 50_000)):
        for i in range(60):
            write_image(root / label / "photos" / f"p{i:03d}.png", seed=offset + i)
        for clip in range(10):
            for frame in range(3):
                write_image(root / label / "clips" / f"c{clip}" / f"{frame}.png",
                            seed=offset + 1000 + 10 * clip + frame)

    def val_groups(data_dir: Path) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], set] = {}
        for row in manifest(data_dir):
            if row["split"] == "val":
                key = (row["label"], row["source"].split("/")[1])
                found.setdefault(key, set()).add(row["group"])
        return {key: len(groups) for key, groups in sorted(found.items())}

    pattern = r"^clips/(c\d+)/"  # a clip's frames and its twin in the other class: one group

    for seed in range(4):
        report = make_split(root, tmp_path / f"s{seed}", seed=seed, stratify="source",
                            group_pattern=pattern)
        assert val_groups(tmp_path / f"s{seed}") == {
            ("fake", "clips"): 2, ("fake", "photos"): 12, ("real", "clips"): 2,
            ("real", "photos"): 12}
        assert report["params"]["stratify"] == "source"
        assert "per class and source folder" in report["rules"]["train/val/test"]
    by_class = [val_groups(tmp_path / f"c{seed}") for seed in range(4)
                if make_split(root, tmp_path / f"c{seed}", seed=seed, group_pattern=pattern)]
    assert any(v.get(("real", "clips"), 0) != 2 for v in by_class)  # what stratify prevents
    assert all(sum(n for (label, _), n in v.items() if label == "real") == 14
               for v in by_class)  # the class's share is the same either way


def test_a_source_folder_too_small_to_split_is_named(tmp_path):
    for label, offset in (("real", 0), ("fake", 500)):
        for i in range(6):
            write_image(tmp_path / "raw" / label / "big" / f"{i}.png", seed=offset + i)
    write_image(tmp_path / "raw" / "real" / "small" / "only.png", seed=999)
    with pytest.raises(SplitError, match=r"class 'real' in source folder real/small has 1 "
                       r"usable distinct image\(s\).*or split with stratify=class"):
        make_split(tmp_path / "raw", tmp_path / "data", stratify="source")
    assert not (tmp_path / "data").exists()
    assert make_split(tmp_path / "raw", tmp_path / "data")["counts"]["val"]["real"] == 1
