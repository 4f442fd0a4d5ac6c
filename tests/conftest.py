"""Shared fixtures: small synthetic images and clips made in tmp_path; nothing here needs
../shared."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from dfutils import datasets, faces, paths
from dfutils.params import FacesParams, SplitParams
from dfutils.split import split


def write_image(path: Path, seed: int, size: int = 32, mode: str = "RGB", fmt: str | None = None,
                bright: bool | None = None) -> Path:
    """A random image; `bright` True/False makes a class that a model can tell apart."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if bright is not None:
        pixels = (pixels // 4 + (160 if bright else 20)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def make_raw(root: Path, n_real: int = 10, n_fake: int = 10, size: int = 32,
             separable: bool = False) -> Path:
    """raw/real/*.png and raw/fake/*.png; with `separable`, fakes are bright and reals dark."""
    for i in range(n_real):
        write_image(root / "real" / f"r{i:03d}.png", seed=i, size=size,
                    bright=False if separable else None)
    for i in range(n_fake):
        write_image(root / "fake" / f"f{i:03d}.png", seed=10_000 + i, size=size,
                    bright=True if separable else None)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its content hash and mode: to show nothing changed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            + f":{p.stat().st_mode:o}:{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_split(raw_dir: Path, data_dir: Path, **values) -> dict:
    """dfutils.split.split on raw_dir into data_dir, other parameters as given."""
    return split(SplitParams(raw_dir=str(raw_dir), data_dir=str(data_dir), **values))


def evaluate(run_dir: Path, data: Path, name: str, sweeps: dict | None = None, **values
             ) -> tuple[dict, dict]:
    """dfutils.evaluate.evaluate_folder of a run on a folder (or, with split=, a split)."""
    from dfutils.corruptions import SWEEPS
    from dfutils.evaluate import evaluate_folder
    from dfutils.params import EvalParams

    params = EvalParams(run_dir=str(run_dir), eval_dir=str(data), name=name, **values)
    return evaluate_folder(params, SWEEPS if sweeps is None else sweeps)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_raw(tmp_path / "raw")


@pytest.fixture
def separable_split(tmp_path_factory) -> Path:
    """A split of an easy data set (bright fakes, dark reals) for training tests."""
    root = tmp_path_factory.mktemp("separable")
    make_raw(root / "raw", 24, 24, separable=True)
    make_split(root / "raw", root / "data", seed=0)
    return root / "data"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder holding a randomly initialised 32 px model, as 02-train saves it."""
    import torch

    from dfutils.model import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet18", None, "all").eval()
    run = tmp_path / "run"
    save_checkpoint(run / "model.pt", model, params={"image_size": 32, "trainable": "all"},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
    return run


@pytest.fixture
def notebooks_that(monkeypatch):
    """Replace papermill's execution: `notebooks_that(fail={step: exception})`; the calls
    made are recorded as (step, parameters)."""
    from dfutils import pipeline

    calls = []

    def install(fail: dict | None = None):
        calls.clear()

        def execute(notebook, output, parameters, **kwargs):
            step = Path(notebook).stem
            calls.append((step, parameters))
            if step in (fail or {}):
                raise fail[step]
            Path(output).write_text("{}")
        monkeypatch.setattr(pipeline.papermill, "execute_notebook", execute)
        return calls
    return install


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


# The astronaut's face as dlib finds it, inside the crop of the photo we move around.
PATCH = skimage.data.astronaut()[40:240, 120:330]
FACE = np.array([179 - 120, 83 - 40, 266 - 120, 170 - 40], float)  # left, top, right, bottom
CANVAS = (300, 360)  # height, width


def frame_of(k: int, face: bool = True, shade: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Frame k (RGB) and the face box in it: the patch scaled by 1.2 + 0.02 k, moved right
    and down by (10 + 6 k, 8 + 3 k), on a background of grey `shade` (which also tints the
    photo a little, so no two clips share a frame)."""
    canvas = np.full((*CANVAS, 3), shade, np.uint8)
    scale, dx, dy = 1.2 + 0.02 * k, 10 + 6 * k, 8 + 3 * k
    if face:
        tinted = np.clip(PATCH.astype(int) + (shade - 40) // 4, 0, 255).astype(np.uint8)
        patch = cv2.resize(tinted, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        h, w = min(patch.shape[0], CANVAS[0] - dy), min(patch.shape[1], CANVAS[1] - dx)
        canvas[dy:dy + h, dx:dx + w] = patch[:h, :w]
    else:  # the sky of the photo: texture, no face
        canvas[:] = cv2.resize(skimage.data.astronaut()[:120, 400:], CANVAS[::-1])
    return canvas, FACE * scale + [dx, dy, dx, dy]


def write_clip(path: Path, n: int, face: bool = True, shade: int = 40) -> list[np.ndarray]:
    """An mp4v clip of n frames; returns the boxes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, CANVAS[::-1])
    boxes = []
    for k in range(n):
        frame, box = frame_of(k, face, shade)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        boxes.append(box)
    writer.release()
    return boxes


# -- The published data sets' layouts, from tiny clips (test_datasets, test_benchmark) ----

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
    with open(data_dir / paths.MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    root = tmp_path_factory.mktemp("sets")
    return {
        "ffpp": prepare(root, "ffpp", make_ffpp(root / "FaceForensics++"), "ffpp"),
        "celebdf": prepare(root, "celebdf", make_celebdf(root / "Celeb-DF-v2"), "celebdf",
                           val_fraction=0.34),
        "dfdc": prepare(root, "dfdc", make_dfdc(root / "DFDC"), "dfdc", val_fraction=0.4),
    }


