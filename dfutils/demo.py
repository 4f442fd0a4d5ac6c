"""The built-in demo data set: real crops of scikit-image's sample photographs, and fakes
made from them by self-blending, with the blend masks saved.

Self-blending (Shiohara and Yamasaki, "Detecting Deepfakes with Self-Blended Images",
CVPR 2022) makes a fake from a real image alone: a colour- and geometry-transformed copy
of the image is blended back into it inside a smooth random mask. The seams and the
colour mismatch are the kind of evidence a face-swap leaves, and because the mask is
known, Grad-CAM can be scored on whether it points at the manipulated region.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

from dfutils.paths import resolve
from dfutils.progress import tqdm

# Photographs that ship inside scikit-image (no download needed); grey ones are made RGB.
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
           "immunohistochemistry", "camera", "coins", "grass", "gravel",
           "brick", "moon", "cell", "clock")


def source_images() -> list[np.ndarray]:
    """The sample photographs as RGB uint8 arrays."""
    images = []
    for name in SOURCES:
        image = getattr(skimage.data, name)()
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        images.append(rgb)
    return images


def random_crop(rng: np.random.Generator, images: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (25-70 % of the shorter side) of a random image, resized."""
    image = images[rng.integers(len(images))]
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 0.7))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop


def blend_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random blob in [0, 1]: a rotated ellipse near the centre, Gaussian-blurred."""
    mask = np.zeros((size, size), np.float32)
    centre = (int(size * rng.uniform(0.3, 0.7)), int(size * rng.uniform(0.3, 0.7)))
    axes = (int(size * rng.uniform(0.15, 0.32)), int(size * rng.uniform(0.15, 0.32)))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
    sigma = size * rng.uniform(0.02, 0.06)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    return mask / max(float(mask.max()), 1e-6)


def self_blend(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fake made from `image` alone, and its mask (1 = manipulated)."""
    size = image.shape[0]
    source = image.astype(np.float32)
    # Colour: per-channel gain and offset, as a swapped-in face differs in tone.
    gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    offset = (rng.choice([-1, 1], 3) * rng.uniform(15, 40, 3)).astype(np.float32)
    source = np.clip(source * gain + offset, 0, 255)
    # Geometry: a small scale and shift, so edges inside the blend no longer line up.
    scale, (dx, dy) = rng.uniform(0.94, 1.06), rng.uniform(-0.04, 0.04, 2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, scale)
    matrix[:, 2] += (dx, dy)
    source = cv2.warpAffine(source, matrix, (size, size), borderMode=cv2.BORDER_REFLECT)
    # Resolution: a blurred copy, the softness of a generated region pasted into a photo.
    source = cv2.GaussianBlur(source, (0, 0), rng.uniform(0.6, 1.2))
    mask = blend_mask(rng, size)
    ratio = rng.uniform(0.75, 1.0)
    fake = image * (1 - ratio * mask[..., None]) + source * (ratio * mask[..., None])
    return np.clip(fake + 0.5, 0, 255).astype(np.uint8), mask


def build_demo(out_dir: str | os.PathLike = "data/demo_raw", n_per_class: int = 400,
               size: int = 96, seed: int = 0) -> Path:
    """Write out_dir/{real,fake}/*.png and out_dir/fake/masks/*.png; deterministic for a seed.

    An existing demo built with the same settings is kept as it is; other settings rebuild
    it in a temporary folder that replaces the old one in one rename.
    """
    out_dir = resolve(out_dir)
    settings = {"n_per_class": n_per_class, "size": size, "seed": seed, "sources": SOURCES}
    info = out_dir / "demo.json"
    if info.is_file() and json.loads(info.read_text()) == json.loads(json.dumps(settings)):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in ("real", "fake", "fake/masks"):
        (tmp / folder).mkdir(parents=True)
    images = source_images()
    for i in tqdm(range(n_per_class), desc="building demo", unit="pair"):
        # One generator per index: image i is the same whatever n_per_class is.
        rng = np.random.default_rng([seed, i])
        Image.fromarray(random_crop(rng, images, size)).save(tmp / "real" / f"real_{i:04d}.png")
        fake, mask = self_blend(rng, random_crop(rng, images, size))
        Image.fromarray(fake).save(tmp / "fake" / f"fake_{i:04d}.png")
        mask_file = tmp / "fake" / "masks" / f"fake_{i:04d}.png"
        Image.fromarray(np.uint8(mask * 255 + 0.5)).save(mask_file)
    (tmp / "demo.json").write_text(json.dumps(settings, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
