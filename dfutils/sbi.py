"""Self-Blended Images: training fakes made from real faces alone.

After Shiohara and Yamasaki, "Detecting Deepfakes with Self-Blended Images" (CVPR 2022).
A face swap pastes a face into a frame inside a face-shaped region and blends its edge;
whatever made the face, that leaves traces: a blend boundary, and colour and sharpness that
differ inside from outside. A self-blend makes those traces without a second face: a
slightly altered copy of a face (colour, sharpness, a small shift) is blended back into the
face inside a deformed, blurred hull of its landmarks. A detector trained on reals against
their self-blends learns the traces rather than one generator's fingerprint.

- `self_blend` makes one, deterministically for a given generator;
- `TrainPairs` gives each training real with a new self-blend of it, made in the
  DataLoader workers (`collate_pairs` batches them as real, blend, real, blend, ...);
- `ValidationBlends` is the fixed set that validation and Grad-CAM score: the validation
  reals and one self-blend of each, drawn from VAL_SEED and the image's path, with masks;
- `landmarks_of` gives the 68 landmarks of a split's images: from the faces step (carried
  by the split as data_dir/faces.csv), or found once with the same dlib model and cached in
  data_dir/landmarks.csv.
"""

from __future__ import annotations

import csv
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dfutils.data import ImageLoadError, Sample, load_image, make_loader, read_manifest
from dfutils.paths import resolve, write_csv
from dfutils.progress import tqdm

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # the paper's: a full blend half the time
VAL_SEED = 0  # the validation self-blends: the same in every run on a split
REFERENCE_FACE = 200.0  # px: the face size the mask's kernel sizes below are given for


def _odd(size: float) -> int:
    k = max(int(round(size)), 1)
    return k if k % 2 else k + 1


def hull(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The filled convex hull of the points, as a float32 0/1 mask of `shape` (height, width)."""
    mask = np.zeros(shape, np.float32)
    points = cv2.convexHull(np.round(landmarks).astype(np.int32))
    cv2.fillConvexPoly(mask, points, 1.0)
    return mask


def face_size(landmarks: np.ndarray) -> float:
    """The larger side of the landmarks' bounding box, in pixels."""
    return float(np.ptp(landmarks, axis=0).max())


def deformed_hull(landmarks: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
                  ) -> np.ndarray:
    """The hull after a random affine of the landmarks about their centre (scale 0.9-1.05 per
    axis, turn up to 5 degrees, shift up to 3 % of the face) and a random erosion or
    dilation (up to 5 % of the face)."""
    size = face_size(landmarks)
    centre = landmarks.mean(axis=0)
    scale = rng.uniform(0.9, 1.05, 2)
    angle = np.radians(rng.uniform(-5, 5))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = rng.uniform(-0.03, 0.03, 2) * size
    points = (landmarks - centre) @ (rotation * scale).T + centre + shift
    mask = hull(points, shape)
    radius = int(rng.integers(0, max(int(0.05 * size), 1) + 1))
    if radius:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
        mask = (cv2.erode if rng.random() < 0.5 else cv2.dilate)(mask, kernel)
    return mask


def soften(mask: np.ndarray, rng: np.random.Generator, size: float) -> np.ndarray:
    """The paper's two blurs: the first, cut at its maximum, shrinks the mask; the second
    gives it a soft edge of random width. Kernel sizes (odd, 5-25 px for a 200 px face)
    scale with the face; they bound how far the mask reaches past the hull."""
    f = size / REFERENCE_FACE
    k1, k2 = _odd(rng.integers(5, 26) * f), _odd(rng.integers(5, 26) * f)
    blurred = cv2.GaussianBlur(mask, (k1, k1), 0)
    peak = blurred.max()
    if peak <= 0:
        return np.zeros_like(mask)
    inner = (blurred >= peak * (1 - 1e-6)).astype(np.float32)
    soft = cv2.GaussianBlur(inner, (k2, k2), float(rng.integers(5, 46) * f))
    return soft / max(float(soft.max()), 1e-12)


def reach(landmarks: np.ndarray) -> float:
    """How far (px) a self-blend's mask can reach past the landmarks' hull: the largest move
    of a hull point under the deformation (scale, turn, shift, dilation), plus half the
    largest second blur."""
    size = face_size(landmarks)
    radius = float(np.linalg.norm(landmarks - landmarks.mean(axis=0), axis=1).max())
    moved = radius * (0.1 + np.radians(5)) + 0.03 * np.sqrt(2) * size + 0.05 * size
    return moved + _odd(25 * size / REFERENCE_FACE) / 2 + 2


def colour_shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each with probability 0.3 (the paper's): an RGB shift (up to 20 levels), a hue,
    saturation and value change, a brightness and contrast change (up to 10 %). float32."""
    out = image.astype(np.float32)
    if rng.random() < 0.3:
        out = out + rng.uniform(-20, 20, 3).astype(np.float32)
    if rng.random() < 0.3:
        hsv = cv2.cvtColor(np.clip(out, 0, 255) / 255, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-10, 10)) % 360
        hsv[..., 1:] *= rng.uniform(0.85, 1.15, 2).astype(np.float32)
        out = cv2.cvtColor(np.clip(hsv, 0, [360, 1, 1]).astype(np.float32),
                           cv2.COLOR_HSV2RGB) * 255
    if rng.random() < 0.3:
        contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * 255
        out = (out - out.mean()) * contrast + out.mean() + brightness
    return np.clip(out, 0, 255)


def resample(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of: downscaled by 2 or 4 and back (a softer face), or sharpened."""
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        r = int(rng.choice([2, 4]))
        small = cv2.resize(image, (max(w // r, 1), max(h // r, 1)),
                           interpolation=cv2.INTER_NEAREST)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = rng.uniform(0.2, 0.5)
    blurred = cv2.GaussianBlur(image, (0, 0), 1.0)
    return np.clip(image + alpha * (image - blurred), 0, 255)


def shift(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray) -> np.ndarray:
    """A small random affine about the face's centre: translation up to 3 % of the face,
    scale 0.95-1.05."""
    h, w = image.shape[:2]
    centre = landmarks.mean(axis=0)
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), 0.0,
                                     rng.uniform(0.95, 1.05))
    matrix[:, 2] += rng.uniform(-0.03, 0.03, 2) * face_size(landmarks)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def self_blend(image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """A fake made from a real face alone, and its mask.

    `image`: H x W x 3 uint8 RGB; `landmarks`: the face's 68 points (x, y) in its pixels.
    Returns the self-blend (uint8, pixels where the mask is 0 are the original's exactly)
    and the mask (float32 in [0, 1]: the weight of the altered copy). Deterministic for a
    given `rng`.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    size = face_size(landmarks)
    mask = soften(deformed_hull(landmarks, image.shape[:2], rng), rng, size)
    mask *= float(rng.choice(BLEND_RATIOS))
    source = shift(resample(colour_shift(image, rng), rng), rng, landmarks)
    weight = mask[..., None]
    blended = np.clip(weight * source + (1 - weight) * image + 0.5, 0, 255).astype(np.uint8)
    return np.where(weight > 0, blended, image), mask


# ---------------------------------------------------------------------------------------
# Landmarks of a split's images

def _read_table(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _points(text: str) -> np.ndarray | None:
    return np.array(json.loads(text), dtype=np.float64) if text else None


def detect_landmarks(path: Path, finder) -> np.ndarray | None:
    """The 68 landmarks of the most confident face of an image file, in its pixels; the
    detector upsamples once more when it finds none (small crops). None: no face, or the
    file cannot be read."""
    try:
        rgb = np.asarray(load_image(path))
    except ImageLoadError:
        return None
    found = finder.detect(rgb) or finder.detect(rgb, upsample=finder.params.upsample + 1)
    return None if found is None else found[2]


def landmarks_of(data_dir: str | os.PathLike, samples: Sequence[Sample]
                 ) -> tuple[list[np.ndarray | None], dict[str, int]]:
    """The 68 landmarks of each sample (None where no face was found) and where they came
    from: "faces_step" (data_dir/faces.csv, written by the split from the faces step),
    "cached" (data_dir/landmarks.csv, by an earlier call) or "detected" now with the faces
    step's dlib model at its default settings, and "no_face". New detections are added to
    the cache, which is keyed by the image's path and content hash."""
    from dfutils.split import FACES, LANDMARKS

    data_dir = resolve(data_dir)
    rel = [s.path.relative_to(data_dir).as_posix() for s in samples]
    carried = {r["path"]: r["landmarks"] for r in _read_table(data_dir / FACES)}
    sha = {r["path"]: r["sha256"] for r in _read_table(data_dir / "manifest.csv")}
    cache = {r["path"]: r for r in _read_table(data_dir / LANDMARKS)
             if sha.get(r["path"]) == r["sha256"]}
    counts = {"faces_step": 0, "cached": 0, "detected": 0, "no_face": 0}
    found: dict[str, np.ndarray | None] = {}
    missing = []
    for path in rel:
        if path in carried:
            found[path], counts["faces_step"] = _points(carried[path]), counts["faces_step"] + 1
        elif path in cache:
            found[path], counts["cached"] = _points(cache[path]["landmarks"]), counts["cached"] + 1
        else:
            missing.append(path)
    if missing:
        from dfutils.faces import FaceFinder
        from dfutils.params import FacesParams

        finder = FaceFinder(FacesParams())
        for path in tqdm(missing, desc="finding landmarks", unit="img", leave=False):
            found[path] = detect_landmarks(data_dir / path, finder)
            cache[path] = {"path": path, "sha256": sha.get(path, ""), "landmarks": "" if
                           found[path] is None else json.dumps(found[path].round(2).tolist())}
        counts["detected"] = len(missing)
        write_csv(data_dir / LANDMARKS, sorted(cache.values(), key=lambda r: r["path"]),
                  ["path", "sha256", "landmarks"])
    counts["no_face"] = sum(found[p] is None for p in rel)
    return [found[p] for p in rel], counts


def reals_with_faces(data_dir: str | os.PathLike, split: str, limit: int | None = None
                     ) -> tuple[list[Sample], list[np.ndarray], dict[str, int]]:
    """The real images of one split (its first `limit`) that have a face, their landmarks,
    and the counts of `landmarks_of` (with "reals": how many real images were looked at)."""
    reals = [s for s in read_manifest(data_dir, split) if s.label == 0][:limit]
    landmarks, counts = landmarks_of(data_dir, reals)
    kept = [(s, lm) for s, lm in zip(reals, landmarks, strict=True) if lm is not None]
    return [s for s, _ in kept], [lm for _, lm in kept], {"reals": len(reals), **counts}


# ---------------------------------------------------------------------------------------
# Datasets

class TrainPairs(Dataset):
    """Each training real and a new self-blend of it: (2 x C x H x W, labels (0, 1), index),
    the same augmentation drawn independently for each after blending."""

    def __init__(self, samples: Sequence[Sample], landmarks: Sequence[np.ndarray], transform):
        self.samples, self.landmarks, self.transform = list(samples), list(landmarks), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = np.array(load_image(self.samples[index].path))
        # From torch's generator, which the DataLoader seeds per worker from the loader's
        # seed: the blends repeat with the seed, and a resumed run replays them.
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        fake, _ = self_blend(image, self.landmarks[index], rng)
        return (torch.stack([self.transform(image), self.transform(fake)]),
                torch.tensor([0.0, 1.0]), torch.tensor([index, index]))


def collate_pairs(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of pairs as one batch of images: real, its blend, real, its blend, ..."""
    images, labels, indices = zip(*batch, strict=True)
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


class ValidationBlends(Dataset):
    """The validation reals, then one self-blend of each: 2n images labelled 0 then 1, the
    same in every run on the split (each blend is drawn from VAL_SEED and its image's path),
    as (tensor, label, index); `image(i)` gives the RGB array, label and mask."""

    def __init__(self, data_dir: str | os.PathLike, samples: Sequence[Sample],
                 landmarks: Sequence[np.ndarray], transform=None):
        data_dir = resolve(data_dir)
        self.samples, self.landmarks, self.transform = list(samples), list(landmarks), transform
        self.keys = [zlib.crc32(s.path.relative_to(data_dir).as_posix().encode())
                     for s in self.samples]

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def image(self, index: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        n = len(self.samples)
        real = np.array(load_image(self.samples[index % n].path))
        if index < n:
            return real, 0, None
        rng = np.random.default_rng([VAL_SEED, self.keys[index - n]])
        fake, mask = self_blend(real, self.landmarks[index - n], rng)
        return fake, 1, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rgb, label, _ = self.image(index)
        return self.transform(rgb), torch.tensor(float(label)), index


def validation_blends(data_dir: str | os.PathLike, limit: int | None = None, transform=None
                      ) -> tuple[ValidationBlends, dict[str, int]]:
    """The validation self-blends of a split (of those of its first `limit` reals that have
    a face) and the counts of `reals_with_faces`."""
    reals, landmarks, counts = reals_with_faces(data_dir, "val", limit)
    return ValidationBlends(data_dir, reals, landmarks, transform), counts


def loaders(params) -> tuple[DataLoader, DataLoader, dict]:
    """For a TrainParams with fakes="sbi": the training loader of real/self-blend pairs (a
    batch of batch_size images holds batch_size // 2 reals and their blends), the loader of
    the validation self-blends, and what was found: {"train": counts, "val": counts}."""
    from dfutils.data import eval_transform, train_transform

    train, train_landmarks, train_counts = reals_with_faces(params.data_dir, "train")
    if not train:
        raise ValueError(
            f"fakes='sbi' found no face in the {train_counts['reals']} training reals of "
            f"{resolve(params.data_dir)}: self-blending needs face images (run the faces step "
            "on photos or clips, or use fakes='data')")
    augment = train_transform(params.image_size, params.jitter, params.jpeg_prob,
                              params.blur_prob, params.flip, params.crop_scale, params.erasing)
    val, val_counts = validation_blends(params.data_dir,
                                        transform=eval_transform(params.image_size))
    if not val.samples:
        raise ValueError(f"fakes='sbi' found no face in the validation reals of "
                         f"{resolve(params.data_dir)}: there is nothing to validate on")
    pairs = make_loader(TrainPairs(train, train_landmarks, augment),
                        max(params.batch_size // 2, 1), True, params.num_workers, params.seed,
                        collate_fn=collate_pairs)
    blends = make_loader(val, params.batch_size, False, params.num_workers, params.seed)
    return pairs, blends, {"train": train_counts, "val": val_counts}


def describe(found: dict) -> str:
    """One line on the faces `loaders` found, for the training log."""
    parts = []
    for split, c in found.items():
        where = ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in ("faces_step", "cached",
                                                                     "detected") if c[k])
        parts.append(f"{split}: {c['reals'] - c['no_face']} of {c['reals']} reals have a face "
                     f"({where}); {c['no_face']} left out")
    return "self-blended images: " + "; ".join(parts)


def plot_examples(blends: ValidationBlends, n: int = 4):
    """A figure of the first `n` validation reals, their self-blends and the masks."""
    from dfutils import viz

    n = min(n, len(blends.samples))
    images, titles = [], []
    for i in range(n):
        real, _, _ = blends.image(i)
        fake, _, mask = blends.image(len(blends.samples) + i)
        images += [real, fake, np.repeat(np.uint8(mask * 255 + 0.5)[..., None], 3, axis=2)]
        titles += ["real", "self-blend", f"mask (max {mask.max():.2f})"]
    return viz.image_grid(images, titles, ncols=3)
