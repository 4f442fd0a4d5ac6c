"""Shared fixtures: small synthetic images and clips made in tmp_path; nothing here needs
../shared."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps


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
    from dfutils.params import SplitParams
    from dfutils.split import split

    return split(SplitParams(raw_dir=str(raw_dir), data_dir=str(data_dir), **values))


def evaluate(run_dir: Path, data: Path, name: str, sweeps: dict | None = None, **values
             ) -> tuple[dict, dict]:
    """dfutils.inference.evaluate_folder of a run on a folder (or, with split=, a split)."""
    from dfutils.inference import SWEEPS, evaluate_folder
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
    model = build_model(None, "all").eval()
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
