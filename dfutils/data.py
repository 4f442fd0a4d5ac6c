"""Images in, tensors out: the manifest-backed dataset, its transforms and loaders.

Labels come from the manifest (fake = 1, real = 0), never from folder order:
torchvision's ImageFolder would sort `fake` before `real` and give the opposite.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from dfutils import LABELS, archs, files
from dfutils.distributed import per_rank_batch, world
from dfutils.paths import resolve

if TYPE_CHECKING:
    from dfutils.params import TrainParams

# The splits a manifest may hold. `test` comes from a data set's official test list; nothing
# trains or selects on it: the loaders of training read train and val only.
SPLITS = ("train", "val", "test")


class ImageLoadError(OSError):
    """A file that cannot be loaded as an image; `reason` says why without the path."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    label: int  # fake = 1, real = 0
    mask: Path | None  # ground-truth mask of a fake image, if known
    video: str = ""  # the clip it comes from (video-level metrics score each clip as one)
    group: str = ""  # what the split kept together (a clip, or the clips of one scene)
    method: str = ""  # the manipulation of a fake of a published data set (FF++'s, say)
    source: str = ""  # its path in the folder the split was made from (real/..., fake/...)


def read_manifest(data_dir: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """The rows of data_dir/manifest.csv (optionally one split of SPLITS), in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    data_dir = resolve(data_dir)
    manifest = data_dir / files.MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: run the split first (notebook 01-split or `make split`)"
        )
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split]
    return [Sample(data_dir / r["path"], LABELS[r["label"]],
                   data_dir / r["mask"] if r.get("mask") else None, r.get("video") or r["path"],
                   r.get("group") or r["path"], r.get("method", ""), r.get("source", ""))
            for r in rows]


@dataclass(frozen=True)
class Prediction:
    path: Path  # absolute
    label: int
    p_fake: float
    mask: Path | None
    video: str = ""  # the clip it comes from (intervals resample whole clips)
    source: str = ""  # its path in the folder the split was made from (real/..., fake/...)


def read_predictions(csv_path: str | os.PathLike, data_dir: str | os.PathLike
                     ) -> list[Prediction]:
    """A run's val_predictions.csv joined with the manifest (for ground-truth masks)."""
    data_dir = resolve(data_dir)
    samples = {s.path: s for s in read_manifest(data_dir)}
    with open(resolve(csv_path), newline="") as f:
        rows = list(csv.DictReader(f))
    found = [(r, samples.get(data_dir / r["path"])) for r in rows]
    return [Prediction(data_dir / r["path"], int(r["label"]), float(r["p_fake"]),
                       s and s.mask, r.get("video") or r["path"], s.source if s else "")
            for r, s in found]


def load_image(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """An RGB image as displayed: EXIF orientation applied, any mode (L, RGBA, P, I;16) made RGB.

    The split checks every file with this same function, so what it accepts, training can
    load. Any failure is an ImageLoadError naming the file: Pillow's decoders and its EXIF
    parser raise many types (OSError, SyntaxError, struct.error, ...), and one odd file must
    be reported, not crash a batch. An image over Pillow's pixel limit is refused too (a
    decompression bomb), not only those over twice the limit.
    """
    name = getattr(source, "name", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image = ImageOps.exif_transpose(image)
                if image.mode == "I;16" or image.mode == "I":
                    # 16-bit grey: scale to 8 bits rather than clipping everything to white.
                    array = np.asarray(image, dtype=np.float32) / 256.0
                    image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (the content is not a format Pillow can "
                             "read)") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        raise ImageLoadError(name, error.strerror or type(error).__name__) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(name, f"too many pixels: {error}") from None
    except MemoryError:
        raise ImageLoadError(name, "too large to decode in memory") from None
    except Exception as error:  # noqa: BLE001 - see the docstring
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageLoadError(name, f"corrupt or unreadable image ({type(error).__name__}: "
                             f"{reason})") from error


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as a boolean array of `size` (width, height): True = manipulated."""
    with Image.open(path) as mask:
        mask = mask.convert("L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(mask) >= 128


def _normalise(arch: str) -> v2.Compose:
    entry = archs.get(arch)
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(entry.mean, entry.std)])


def eval_transform(image_size: int, arch: str = archs.DEFAULT) -> v2.Compose:
    """Resize to a square and normalise as the architecture's weights expect."""
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
                       *_normalise(arch).transforms])


def train_transform(params: TrainParams) -> v2.Compose:
    """The training augmentation of a TrainParams: the original recipe's colour jitter and
    horizontal flip, plus optional JPEG, blur, random resized crops and erasing.

    Resizing comes first so every later step works on the small image. JPEG re-encoding
    and blur at random strengths are the robustness recipe of Wang et al. (CVPR 2020).
    `crop_scale` < 1 resizes a random crop of at least that share of the image instead.
    `erasing` is the probability of blanking one rectangle (2-25 % of the image) to the
    mean colour, after normalisation.
    """
    size = (params.image_size, params.image_size)
    resize = (v2.Resize(size, antialias=True) if params.crop_scale >= 1 else
              v2.RandomResizedCrop(size, scale=(params.crop_scale, 1.0), ratio=(0.9, 1.1),
                                   antialias=True))
    steps: list = [v2.ToImage(), resize]
    if params.jpeg_prob > 0:
        steps.append(v2.RandomApply([v2.JPEG(quality=(30, 100))], p=params.jpeg_prob))
    if params.blur_prob > 0:
        kernel = 2 * (params.image_size // 16) + 1  # odd, about 1/8 of the side: room for sigma 3
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 3.0))],
                                    p=params.blur_prob))
    if any(params.jitter):
        steps.append(v2.ColorJitter(*params.jitter))
    if params.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += _normalise(params.arch).transforms
    if params.erasing > 0:
        steps.append(v2.RandomErasing(p=params.erasing, scale=(0.02, 0.25), value=0))
    return v2.Compose(steps)


class ManifestDataset(Dataset):
    """(image tensor, label as float, index) for the samples of one split."""

    def __init__(self, samples: Sequence[Sample], transform: v2.Compose):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.samples[index]
        image = self.transform(load_image(sample.path))
        return image, torch.tensor(float(sample.label)), index


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; Python and NumPy follow it, so
    # any augmentation drawing from them repeats too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                seed: int = 0, collate_fn=None) -> DataLoader:
    """A DataLoader seeded for repeatable order and augmentation, pinned when CUDA is present.

    `batch_size` is the global batch. The order comes from a DistributedSampler in every
    case (a world of one when not under torchrun), so one process and N processes see the
    same global batches; `fit` calls its set_epoch. Augmentation seeds differ per rank.
    """
    rank, size = world()
    sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=False)
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=per_rank_batch(batch_size),
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
        collate_fn=collate_fn,
    )


def val_loader(params: TrainParams) -> DataLoader:
    """The validation loader of a TrainParams: the split's val images, not augmented."""
    val = ManifestDataset(read_manifest(params.data_dir, "val"),
                          eval_transform(params.image_size, params.arch))
    return make_loader(val, params.batch_size, False, params.num_workers, params.seed)


def train_val_loaders(params: TrainParams) -> tuple[DataLoader, DataLoader]:
    """The training loader (augmented, shuffled) and the validation loader of a TrainParams.
    Training reads only the train split, validation only val: never test."""
    train = ManifestDataset(read_manifest(params.data_dir, "train"), train_transform(params))
    return (make_loader(train, params.batch_size, True, params.num_workers, params.seed),
            val_loader(params))
