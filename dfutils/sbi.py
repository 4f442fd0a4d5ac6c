"""Self-Blended Images: training fakes made from real faces alone (the blend itself is
dfutils.blend, with the face's landmark hull as its mask).

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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dfutils import paths, viz
from dfutils.atomic import write_csv
from dfutils.blend import self_blend
from dfutils.data import ImageSet, eval_transform, make_loader, train_transform
from dfutils.detect import FaceFinder
from dfutils.images import ImageLoadError, load_image
from dfutils.manifest import Sample, read_manifest
from dfutils.params import FacesParams, TrainParams
from dfutils.paths import resolve
from dfutils.progress import tqdm

VAL_SEED = 0  # the validation self-blends: the same in every run on a split


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
    data_dir = resolve(data_dir)
    rel = [s.path.relative_to(data_dir).as_posix() for s in samples]
    carried = {r["path"]: r["landmarks"] for r in _read_table(data_dir / paths.FACES)}
    sha = {r["path"]: r["sha256"] for r in _read_table(data_dir / paths.MANIFEST)}
    cache = {r["path"]: r for r in _read_table(data_dir / paths.LANDMARKS)
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
        finder = FaceFinder(FacesParams())
        for path in tqdm(missing, desc="finding landmarks", unit="img", leave=False):
            found[path] = detect_landmarks(data_dir / path, finder)
            cache[path] = {"path": path, "sha256": sha.get(path, ""), "landmarks": "" if
                           found[path] is None else json.dumps(found[path].round(2).tolist())}
        counts["detected"] = len(missing)
        write_csv(data_dir / paths.LANDMARKS, sorted(cache.values(), key=lambda r: r["path"]),
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
        fake, _ = self_blend(image, rng, self.landmarks[index])
        return (torch.stack([self.transform(image), self.transform(fake)]),
                torch.tensor([0.0, 1.0]), torch.tensor([index, index]))


def collate_pairs(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of pairs as one batch of images: real, its blend, real, its blend, ..."""
    images, labels, indices = zip(*batch, strict=True)
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


class MixedPairs(Dataset):
    """fakes="sbi+data": each training real with what its fake is made from, decided per
    batch by `MixedCollate`: a self-blend of it, or one of the split's fake images. An item
    is (real RGB, its landmarks, the blend's seed, a split fake's index, its index): the
    work (blending, or loading the fake) is done only for the fake the batch keeps."""

    def __init__(self, samples: Sequence[Sample], landmarks: Sequence[np.ndarray],
                 fakes: Sequence[Sample]):
        self.samples, self.landmarks, self.fakes = list(samples), list(landmarks), list(fakes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        # Both draws from torch's generator, seeded per worker by the loader: the batches
        # repeat with the seed, and a resumed run replays them.
        seed = int(torch.randint(2**62, ()))
        fake = int(torch.randint(len(self.fakes), ()))
        return (np.array(load_image(self.samples[index].path)), self.landmarks[index], seed,
                fake, index)


class MixedCollate:
    """A batch of k `MixedPairs` items as 2k images, real then fake: the first
    round(share k) fakes are self-blends of their reals, the others the split's fakes
    (exactly, in every batch); labels (0, 1) each; indices: the real's, for both."""

    def __init__(self, dataset: MixedPairs, share: float, transform):
        self.dataset, self.share, self.transform = dataset, share, transform

    def blends(self, k: int) -> int:
        return int(round(self.share * k))

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, indices = [], []
        for position, (real, landmarks, seed, fake, index) in enumerate(batch):
            if position < self.blends(len(batch)):
                other, _ = self_blend(real, np.random.default_rng(seed), landmarks)
            else:
                other = np.array(load_image(self.dataset.fakes[fake].path))
            images += [self.transform(real), self.transform(other)]
            indices += [index, index]
        return (torch.stack(images), torch.tensor([0.0, 1.0] * len(batch)),
                torch.tensor(indices))


class ValidationBlends:
    """The validation reals, then one self-blend of each: 2n images labelled 0 then 1, the
    same in every run on the split (each blend is drawn from VAL_SEED and its image's path);
    `image(i)` gives the RGB array, label and mask, `images(transform)` the set scoring
    reads."""

    def __init__(self, data_dir: str | os.PathLike, samples: Sequence[Sample],
                 landmarks: Sequence[np.ndarray]):
        data_dir = resolve(data_dir)
        self.samples, self.landmarks = list(samples), list(landmarks)
        self.keys = [zlib.crc32(s.path.relative_to(data_dir).as_posix().encode())
                     for s in self.samples]

    def __len__(self) -> int:
        return 2 * len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [0] * len(self.samples) + [1] * len(self.samples)

    def rgb(self, index: int) -> np.ndarray:
        return self.image(index)[0]

    def images(self, transform, size: int) -> ImageSet:
        """The 2n images as scoring reads them, each made when it is read."""
        return ImageSet(range(len(self)), transform, size, load=self.rgb, labels=self.labels)

    def image(self, index: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        n = len(self.samples)
        real = np.array(load_image(self.samples[index % n].path))
        if index < n:
            return real, 0, None
        rng = np.random.default_rng([VAL_SEED, self.keys[index - n]])
        fake, mask = self_blend(real, rng, self.landmarks[index - n])
        return fake, 1, mask



def validation_blends(data_dir: str | os.PathLike, limit: int | None = None,
                      split: str = "val") -> tuple[ValidationBlends, dict[str, int]]:
    """The validation self-blends of a split (of those of its first `limit` reals that have
    a face; of another `split`'s reals alike) and the counts of `reals_with_faces`."""
    reals, landmarks, counts = reals_with_faces(data_dir, split, limit)
    return ValidationBlends(data_dir, reals, landmarks), counts


def loaders(params: TrainParams
            ) -> tuple[DataLoader, DataLoader, ValidationBlends, dict]:
    """For a TrainParams with fakes="sbi": the training loader of real/self-blend pairs (a
    batch of batch_size images holds batch_size // 2 reals and their blends; with
    "sbi+data", sbi_share of those fakes are blends and the rest the split's fake images),
    the loader of the validation self-blends, those blends, and what was found: {"train":
    counts, "val": counts}."""
    train, train_landmarks, train_counts = reals_with_faces(params.data_dir, "train")
    if not train:
        raise ValueError(
            f"fakes='sbi' found no face in the {train_counts['reals']} training reals of "
            f"{resolve(params.data_dir)}: self-blending needs face images (run the faces step "
            "on photos or clips, or use fakes='data')")
    augment = train_transform(params)
    val, val_counts = validation_blends(params.data_dir)
    if not val.samples:
        raise ValueError(f"fakes='sbi' found no face in the validation reals of "
                         f"{resolve(params.data_dir)}: there is nothing to validate on")
    if params.fakes == "sbi+data":
        fakes = [s for s in read_manifest(params.data_dir, "train") if s.label == 1]
        if not fakes:
            raise ValueError(f'fakes="sbi+data" found no fake image in the training split of '
                             f'{resolve(params.data_dir)}: use fakes="sbi", or add fakes')
        mixed = MixedPairs(train, train_landmarks, fakes)
        pairs = make_loader(mixed, max(params.batch_size // 2, 1), True, params.num_workers,
                            params.seed, collate_fn=MixedCollate(mixed, params.sbi_share,
                                                                 augment))
    else:
        pairs = make_loader(TrainPairs(train, train_landmarks, augment),
                            max(params.batch_size // 2, 1), True, params.num_workers,
                            params.seed, collate_fn=collate_pairs)
    blends = make_loader(val.images(eval_transform(params.image_size, params.arch),
                                    params.image_size),
                         params.batch_size, False, params.num_workers, params.seed)
    return pairs, blends, val, {"train": train_counts, "val": val_counts}


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
    n = min(n, len(blends.samples))
    images, titles = [], []
    for i in range(n):
        real, _, _ = blends.image(i)
        fake, _, mask = blends.image(len(blends.samples) + i)
        images += [real, fake, np.repeat(np.uint8(mask * 255 + 0.5)[..., None], 3, axis=2)]
        titles += ["real", "self-blend", f"mask (max {mask.max():.2f})"]
    return viz.image_grid(images, titles, ncols=3)
