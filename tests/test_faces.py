"""The faces step on clips and photos made here from scikit-image's astronaut photo, moved and
scaled across frames so the face box of every frame is known (nothing from ../shared)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import evaluate, frame_of, make_split, tree_digest, write_clip

from dfutils import faces, frames, paths, viz
from dfutils.params import FacesParams


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


PARAMS = {"frames_per_video": 5, "face_size": 64}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Clips and photos of both classes, and every kind of bad input."""
    root = tmp_path_factory.mktemp("faces") / "raw"
    write_clip(root / "real" / "clip_a.mp4", 12)
    write_clip(root / "real" / "sub" / "clip_b.MP4", 9, shade=60)
    write_clip(root / "fake" / "clip_c.mp4", 12, shade=80)
    write_clip(root / "fake" / "short.avi", 3, shade=100)  # shorter than frames_per_video
    write_clip(root / "fake" / "one.mp4", 1, shade=120)
    write_clip(root / "real" / "noface.mp4", 6, face=False)
    cv2.imwrite(str(root / "real" / "photo.jpg"), cv2.cvtColor(frame_of(2)[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "fake" / "sky.png"),
                cv2.cvtColor(frame_of(0, face=False)[0], cv2.COLOR_RGB2BGR))
    (root / "fake" / "empty.mp4").write_bytes(b"")
    (root / "fake" / "text.mp4").write_text("not a video")
    whole = root / "real" / "clip_a.mp4"
    (root / "fake" / "truncated.mp4").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 3])
    (root / "real" / "notes.txt").write_text("a note")
    return root


@pytest.fixture(scope="module")
def extracted(raw, tmp_path_factory):
    before = tree_digest(raw)
    out = tmp_path_factory.mktemp("faces_out") / "faces"
    report = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS))
    assert tree_digest(raw) == before  # raw_dir is only read
    return out, report


@pytest.mark.parametrize("n,k,expected", [(12, 5, [0, 3, 6, 8, 11]), (3, 5, [0, 1, 2]),
                                          (1, 32, [0]), (100, 2, [0, 99]), (5, 5, [0, 1, 2, 3, 4])])
def test_frames_are_evenly_spaced_first_and_last_included(n, k, expected):
    assert frames.sample_indices(n, k) == expected


def test_the_chosen_frames_are_decoded_exactly(raw):
    clip = raw / "real" / "clip_a.mp4"
    capture, full = cv2.VideoCapture(str(clip)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        full.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    chosen = list(frames.read_frames(clip, 5))
    assert [i for i, _, _ in chosen] == frames.sample_indices(len(full), 5)
    for index, frame, scale in chosen:
        assert np.array_equal(frame, full[index]) and scale == 1.0


def test_each_crop_holds_the_face_where_it_is(extracted, raw):
    out, _ = extracted
    table = faces.read_faces(out)
    rows = [r for r in table.values() if r["source"] == "real/clip_a.mp4"]
    assert [r["frame"] for r in rows] == frames.sample_indices(12, 5)
    for row in rows:
        assert iou(row["box"], frame_of(row["frame"])[1]) > 0.5
        crop = cv2.imread(str(out / row["path"]))
        assert crop.shape == (64, 64, 3)
        assert (row["landmarks"] >= 0).all() and (row["landmarks"] < 64).all()
        # the face box, mapped into the crop, is centred with the margin around it
        assert row["landmarks"][:, 0].mean() == pytest.approx(32, abs=8)


def test_outputs_follow_the_layout_and_bad_inputs_are_reported_by_name(extracted):
    out, report = extracted
    crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "real/clip_a/000000.png" in crops and "real/sub/clip_b/000008.png" in crops
    assert "real/photo.png" in crops and "fake/one/000000.png" in crops
    assert sorted(p.name for p in (out / "fake" / "short").iterdir()) == [
        "000000.png", "000001.png", "000002.png"]
    by_source = {e["source"]: e for e in report["sources"]}
    assert by_source["real/noface.mp4"]["faces_found"] == 0
    assert by_source["real/noface.mp4"]["frames_read"] == 5
    assert by_source["fake/sky.png"]["faces_found"] == 0
    unreadable = {e["source"]: e["reason"] for e in report["unreadable"]}
    assert set(unreadable) >= {"fake/empty.mp4", "fake/text.mp4", "fake/truncated.mp4"}
    assert {s["source"] for s in report["skipped"]} == {"real/notes.txt"}
    problems = {r["source"]: r["why"] for r in viz.faces_problems(report)}
    assert set(problems) == {"fake/empty.mp4", "fake/text.mp4", "fake/truncated.mp4",
                             "real/noface.mp4", "fake/sky.png", "real/notes.txt",
                             "fake/short.avi", "fake/one.mp4"}  # the last two: every frame
    assert problems["fake/short.avi"] == ("3 frame(s) read, fewer than frames_per_video=5: "
                                          "every frame it has was used")
    assert report["short_clips"] == 2
    with open(out / paths.FACES, newline="") as f:
        assert len(list(csv.DictReader(f))) == report["n_crops"] == len(crops)


def test_a_second_run_changes_nothing_and_other_parameters_need_overwrite(extracted, raw):
    out, report = extracted
    before = tree_digest(out)
    assert faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS)) == (
        report)
    assert tree_digest(out) == before
    with pytest.raises(faces.FacesError, match="overwrite"):
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out),
                                        frames_per_video=3, face_size=64))


def test_a_users_file_in_faces_dir_is_never_replaced(raw, tmp_path):
    out = tmp_path / "faces"
    (out / "real").mkdir(parents=True)
    (out / "real" / "mine.png").write_bytes(b"keep")
    with pytest.raises(faces.FacesError, match="in the way"):
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS))
    assert (out / "real" / "mine.png").read_bytes() == b"keep"


def test_aligned_crops_have_level_eyes(raw, tmp_path):
    out = tmp_path / "aligned"
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), align=True, **PARAMS))
    row = faces.read_faces(out)["real/photo.png"]
    eyes = row["landmarks"][36:42].mean(axis=0), row["landmarks"][42:48].mean(axis=0)
    assert abs(eyes[0][1] - eyes[1][1]) < 1.5  # level to a pixel or so


def test_the_split_keeps_a_clip_in_one_split_and_carries_the_landmarks(extracted, tmp_path):
    out, _ = extracted
    report = make_split(out, tmp_path / "data", val_fraction=0.3, group_by="folder", seed=0)
    with open(tmp_path / "data" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    splits_of: dict[str, set] = {}
    for row in rows:
        splits_of.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert splits_of.keys() >= {"real/clip_a", "real/sub/clip_b", "fake/clip_c"}
    assert report["faces"]["frames_per_video"] == 5
    with open(tmp_path / "data" / "faces.csv", newline="") as f:
        carried = {r["path"]: r for r in csv.DictReader(f)}
    assert set(carried) == {r["path"] for r in rows}
    assert len(json.loads(next(iter(carried.values()))["landmarks"])) == 68


def test_adding_a_folder_moves_at_most_one_other(tmp_path):
    from conftest import write_image

    root = tmp_path / "raw"
    for label in ("real", "fake"):
        for g in range(10):
            for i in range(3):
                write_image(root / label / f"g{g}" / f"{i}.png", seed=hash((label, g, i)) % 10**6)
    make_split(root, tmp_path / "a", group_by="folder", seed=1)
    for i in range(3):
        write_image(root / "real" / "g_new" / f"{i}.png", seed=777 + i)
    make_split(root, tmp_path / "b", group_by="folder", seed=1)

    def groups(data):
        with open(data / "manifest.csv", newline="") as f:
            return {r["group"]: r["split"] for r in csv.DictReader(f)}
    before, after = groups(tmp_path / "a"), groups(tmp_path / "b")
    moved = [g for g in before if before[g] != after[g]]
    assert len(moved) <= 1


@pytest.mark.notebooks
def test_the_faces_notebook_runs(raw, tmp_path):
    import papermill

    from dfutils.paths import REPO_ROOT

    papermill.execute_notebook(REPO_ROOT / "notebooks/00-faces.ipynb", tmp_path / "o.ipynb",
                               parameters={"raw_dir": str(raw), "faces_dir": str(tmp_path / "f"),
                                           **PARAMS},
                               kernel_name="python3", cwd=REPO_ROOT / "notebooks",
                               progress_bar=False)
    executed = json.loads((tmp_path / "o.ipynb").read_text())
    assert "real/noface.mp4" in json.dumps(executed["cells"][-1]["outputs"])
    assert (tmp_path / "f" / paths.FACES_REPORT).is_file()


@pytest.fixture(scope="module")
def face_run(raw, tmp_path_factory) -> Path:
    """A run whose (random, 32 px) model was 'trained' on crops made with PARAMS."""
    import torch

    from dfutils.model import build_model, save_checkpoint

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("face_run") / "run"
    recorded = {k: v for k, v in FacesParams(raw_dir=str(raw), **PARAMS).to_dict().items()
                if k not in ("faces_dir", "overwrite")}
    save_checkpoint(run / "model.pt", build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1, faces=recorded)
    return run


def test_predict_crops_clips_and_photos_the_way_training_did(face_run, raw, tmp_path):
    from dfutils.__main__ import main

    inputs = [raw / "real" / "clip_a.mp4", raw / "real" / "photo.jpg",
              raw / "real" / "noface.mp4", raw / "fake" / "text.mp4"]
    out, frames_out, cams = tmp_path / "p.csv", tmp_path / "frames.csv", tmp_path / "cams"
    assert main(["predict", "--run", str(face_run), *map(str, inputs), "--out", str(out),
                 "--frames-out", str(frames_out), "--cam-dir", str(cams)]) == 0
    assert sorted(p.name for p in cams.iterdir())[:2] == ["clip_a.mp4.000000.cam.png",
                                                          "clip_a.mp4.000003.cam.png"]
    assert len(list(cams.iterdir())) == 5 + 1  # one per crop: the clip's five, the photo
    with open(out, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert list(rows) == ["clip_a.mp4", "photo.jpg", "noface.mp4", "text.mp4"]  # one each
    clip = rows["clip_a.mp4"]
    assert (clip["status"], clip["n_frames"], clip["n_faces"]) == ("ok", "5", "5")
    assert (rows["photo.jpg"]["n_frames"], rows["photo.jpg"]["n_faces"]) == ("1", "1")
    assert rows["noface.mp4"]["status"] == "error: no face found in the frames read"
    assert rows["noface.mp4"]["n_frames"] == "5"
    assert rows["text.mp4"]["status"].startswith("error: not a video")
    with open(frames_out, newline="") as f:
        per_frame = [r for r in csv.DictReader(f) if r["path"].endswith("clip_a.mp4")]
    assert [int(r["frame"]) for r in per_frame] == frames.sample_indices(12, 5)
    assert float(clip["p_fake"]) == pytest.approx(
        np.mean([float(r["p_fake"]) for r in per_frame]), abs=1e-5)


def test_predict_without_faces_scores_files_as_they_are(face_run, raw, capsys):
    from dfutils.__main__ import main

    assert main(["predict", "--run", str(face_run), str(raw / "real" / "photo.jpg"),
                 "--no-faces"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,p_fake,label,status"


def test_evaluate_crops_a_folder_of_clips_and_reports_videos(face_run, raw):
    before = tree_digest(raw)
    report, _ = evaluate(face_run, raw, "clips", batch_size=8, sweeps={"jpeg": (100,)})
    assert tree_digest(raw) == before
    video = report["metrics"]["video"]
    # clips and photos with a face: clip_a, clip_b, photo (real); clip_c, short, one (fake)
    assert video["n"] == 6 and report["n_images"] == 5 + 5 + 1 + 5 + 3 + 1
    assert {u["path"] for u in report["skipped"]} >= {"fake/text.mp4", "real/notes.txt"}


def test_evaluate_on_a_folder_without_faces_says_so_in_one_line(face_run, tmp_path):
    """No file gives a crop (found by the browser test: a TypeError escaped before)."""
    for label in ("real", "fake"):
        (tmp_path / "sky" / label).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "sky" / label / "sky.png"), frame_of(0, face=False)[0])
    with pytest.raises(ValueError, match=r"no real image of .*sky could be read"):
        evaluate(face_run, tmp_path / "sky", "sky", sweeps={})


@pytest.mark.notebooks
def test_the_chain_with_faces_reports_frame_and_video_level_metrics(raw, tmp_path):
    from dfutils import pipeline

    run = pipeline.run_all("f", "notebooks/params/smoke.yaml",
                           {"raw_dir": str(raw), "faces_dir": str(tmp_path / "faces"),
                            "data_dir": str(tmp_path / "data"), **PARAMS},
                           runs_root=tmp_path / "runs", faces=True)
    record = json.loads((run / "run.json").read_text())
    assert [record["steps"][s]["status"] for s in pipeline.STEPS if s in record["steps"]] == [
        "done"] * 4
    assert record["steps"]["01-split"]["params"]["raw_dir"] == str(tmp_path / "faces")
    assert record["steps"]["01-split"]["params"]["group_by"] == "folder"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["video"]["n"] == 2  # one clip of each class in validation
    assert record["summary"]["val_video_auc"] == metrics["video"]["auc"]
    with open(run / "val_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["video"] for r in rows}) == 2 and all(r["group"] == r["video"] for r in rows)


def test_a_photo_is_its_own_group_and_video_beside_clips(tmp_path):
    """Issue 26, item 4: with group_by="folder" every photo of a class formed one group and
    one video, and a folder of photos alone failed at the split."""
    raw = tmp_path / "raw"
    for label, shade in (("real", 40), ("fake", 120)):
        write_clip(raw / label / "clip.mp4", 3, shade=shade + 50)
        for i in range(4):
            photo = cv2.cvtColor(frame_of(i, shade=shade + 5 * i)[0], cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(raw / label / f"p{i}.jpg"), photo)
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "f"), **PARAMS))
    make_split(tmp_path / "f", tmp_path / "d", group_by="folder", val_fraction=0.4, seed=0)
    with open(tmp_path / "d" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    photos = [r for r in rows if "clip" not in r["source"]]
    clip = [r for r in rows if "clip" in r["source"]]
    assert len(photos) == 8 and len({r["group"] for r in photos}) == 8
    assert {r["video"] for r in photos} == {r["source"] for r in photos}
    assert len({r["group"] for r in clip}) == 2 and len({r["video"] for r in clip}) == 2


def test_inputs_whose_crops_would_coincide_are_named_before_any_work(tmp_path):
    """Issue 26, item 3: a clip and a photo whose crops map to one name gave two rows in
    faces.csv for one file (the surviving crop depending on worker timing), and so did
    x.v1.jpg and x.v2.jpg (both cropped to x.png)."""
    raw = tmp_path / "raw"
    write_clip(raw / "real" / "a.mp4", 3)
    write_clip(raw / "fake" / "b.mp4", 3, shade=90)
    photo = cv2.cvtColor(frame_of(1, shade=70)[0], cv2.COLOR_RGB2BGR)
    for name in ("a/000001.png", "a/note.png", "x.v1.jpg", "x.v2.jpg", "d.png"):
        (raw / "real" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(raw / "real" / name), photo)
    write_clip(raw / "real" / "d.png.mp4", 2, shade=60)  # its crops' folder: real/d.png/
    report = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "f"),
                                             **PARAMS), workers=1)
    skipped = {s["source"]: s["reason"] for s in report["skipped"]}
    assert skipped == {
        "real/a/000001.png": "its crop real/a/000001.png would land among the crops of the "
                             "clip real/a.mp4: rename or move one of them",
        "real/a/note.png": "its crop real/a/note.png would land among the crops of the clip "
                           "real/a.mp4: rename or move one of them",
        "real/d.png": "its crop real/d.png would land among the crops of the clip "
                      "real/d.png.mp4: rename or move one of them"}
    with open(tmp_path / "f" / paths.FACES, newline="") as f:
        crops = [row["path"] for row in csv.DictReader(f)]
    assert len(crops) == len(set(crops))  # one row per crop
    assert {"real/x.v1.png", "real/x.v2.png"} <= set(crops)


def test_one_split_from_several_raw_folders_keeps_each_sources_groups(tmp_path):
    """Issue 27, item 2: photos of one data set and clips of another, linked into one raw
    folder (links to folders are followed), through the faces step and one split: each
    photo is its own group, each clip's crops one group, and a real clip and its swapped
    twin (joined by a pattern that only the clips' paths match) one group."""
    photos, clips, raw = tmp_path / "photos", tmp_path / "clips", tmp_path / "raw"
    for label, shade in (("real", 40), ("fake", 120)):
        for i in range(4):
            (photos / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(photos / label / f"p{i}.jpg"),
                        cv2.cvtColor(frame_of(i, shade=shade + 5 * i)[0], cv2.COLOR_RGB2BGR))
        for scene in range(3):
            side = "left_orig" if label == "real" else "right_swap"
            write_clip(clips / label / f"s{scene}_{side}.mp4", 3, shade=shade + 10 * scene)
        (raw / label).mkdir(parents=True)
        (raw / label / "photos").symlink_to(photos / label)
        (raw / label / "clips").symlink_to(clips / label)
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "f"), **PARAMS))
    report = make_split(tmp_path / "f", tmp_path / "d", group_by="folder", val_fraction=0.4,
                        seed=0, group_pattern=r"^clips/(s\d+)_")
    assert report["group_pattern"]["unmatched"] == 8  # the photos: each its own group
    with open(tmp_path / "d" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    photo_rows = [r for r in rows if "/photos/" in r["source"]]
    assert len(photo_rows) == 8 and len({r["group"] for r in photo_rows}) == 8
    scenes: dict[str, set] = {}
    for r in rows:
        if "/clips/" in r["source"]:
            scenes.setdefault(r["source"].split("/clips/")[1][:2], set()).add(
                (r["group"], r["split"]))
    assert len(scenes) == 3 and all(len(s) == 1 for s in scenes.values())  # pairs together


def test_every_face_of_a_frame_is_kept_when_asked(tmp_path):
    """Issue 36, item 15: the faces step kept one face per frame, so the SBI video rule (the
    top P(fake) among the faces at least half the largest's size) could not see a
    two-person clip's other face. With max_faces=2 both are cropped, each with its frame and
    box, and the split carries them to the rule; max_faces=1 is what it was."""
    from conftest import PATCH

    from dfutils.manifest import labelled_set

    raw = tmp_path / "raw"
    face = cv2.resize(PATCH, None, fx=1.2, fy=1.2, interpolation=cv2.INTER_AREA)
    for label, name, shade in (("real", "two", 40), ("fake", "two", 90), ("real", "b", 60),
                               ("fake", "b", 120)):
        path = raw / label / f"{name}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (760, 300))
        tinted = np.clip(face.astype(int) + shade // 4, 0, 255).astype(np.uint8)
        for k in range(3):
            canvas = np.full((300, 760, 3), shade + k, np.uint8)
            canvas[20:20 + face.shape[0], 20:20 + face.shape[1]] = tinted
            canvas[30:30 + face.shape[0], 470:470 + face.shape[1]] = tinted[:, ::-1]
            writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        writer.release()
    one = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "one"),
                                          frames_per_video=3, face_size=64), workers=1)
    both = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "both"),
                                           frames_per_video=3, face_size=64, max_faces=2),
                               workers=1)
    assert one["n_crops"] == 12 and both["n_crops"] == 24
    assert "max_faces" not in one["params"] and both["params"]["max_faces"] == 2
    rows = faces.read_faces(tmp_path / "both")
    assert sorted(p for p in rows if p.startswith("real/two/")) == [
        "real/two/000000.png", "real/two/000000_1.png", "real/two/000001.png",
        "real/two/000001_1.png", "real/two/000002.png", "real/two/000002_1.png"]
    pair = [rows["real/two/000000.png"]["box"], rows["real/two/000000_1.png"]["box"]]
    assert abs(pair[0][0] - pair[1][0]) > 300  # the two faces, not one twice
    assert {p: rows[p] for p in faces.read_faces(tmp_path / "one")}.keys() <= rows.keys()
    make_split(tmp_path / "both", tmp_path / "data", group_by="folder", val_fraction=0.5)
    images = labelled_set(tmp_path / "data", "val")
    for video in set(images.videos):  # two faces in each of its three frames, each sized
        mine = [s for s in images.samples if s.video == video]
        assert len(mine) == 6 and len({s.frame for s in mine}) == 3
        assert min(s.area for s in mine) > 0.5 * max(s.area for s in mine) > 1
