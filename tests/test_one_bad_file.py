"""One bad input never stops a batch: it gets its own reason, and the rest is scored."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    NOT_UTF8,
    broken_exif_jpeg,
    evaluate,
    make_raw,
    make_split,
    rows_of,
    write_image,
)

from dfutils.__main__ import main
from dfutils.data import ManifestDataset, eval_transform
from dfutils.images import ImageLoadError
from dfutils.manifest import Sample

# -- one bad file never stops a batch --------------------------------------------------------

@pytest.mark.parametrize("size", [30, 40])  # over the limit: Pillow warns (30) or raises (40)
def test_predict_and_evaluate_score_the_rest_around_a_bomb_and_broken_exif(
        run_dir, tmp_path, small_pixel_limit, size, capsys):
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
    report, _ = evaluate(run_dir, folder, "x", batch_size=4, sweeps={"jpeg": (100,)})
    assert report["n_images"] == 6
    assert sorted(Path(u["path"]).name for u in report["unreadable"]) == ["bomb.png", "exif.jpg"]


def test_the_split_rejects_what_training_cannot_load_with_its_reason(tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    broken_exif_jpeg(raw / "fake" / "exif.jpg")
    report = make_split(raw, tmp_path / "data")
    (rejected,) = report["rejected"]
    assert rejected["path"] == "fake/exif.jpg" and "corrupt or unreadable" in rejected["reason"]
    dataset = ManifestDataset([Sample(raw / "fake" / "exif.jpg", 1, None)],
                              eval_transform(32, "resnet18"))
    with pytest.raises(ImageLoadError, match="exif.jpg"):
        dataset[0]


def test_file_names_that_are_not_utf8_do_not_stop_the_split_or_predict(run_dir,
                                                                       tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    odd = raw / "real" / NOT_UTF8
    write_image(odd, seed=5)
    report = make_split(raw, tmp_path / "data")
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
                                                                 capsys):
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
    report = make_split(raw, tmp_path / "data")
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
def test_a_file_without_read_permission_is_rejected_by_the_split(tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    (raw / "real" / "r000.png").chmod(0)
    report = make_split(raw, tmp_path / "data")
    assert report["rejected"][0]["reason"].startswith("cannot be read")
