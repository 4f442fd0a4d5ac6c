"""Images in, tensors out: the transforms (normalisation from the architecture registry),
the datasets that feed training and scoring, and their seeded loaders.

Labels come from the manifest (fake = 1, real = 0), never from folder order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from dfutils import archs
from dfutils.corruptions import Perturb
from dfutils.distributed import per_rank_batch, world
from dfutils.images import ImageLoadError, load_image
from dfutils.manifest import LabelledSet, Sample, read_manifest
from dfutils.params import TrainParams


def _normalise(arch: str) -> v2.Compose:
    entry = archs.get(arch)
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(entry.mean, entry.std)])


def eval_transform(image_size: int, arch: str) -> v2.Compose:
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


def _rgb(item: Path | Sample | np.ndarray | torch.Tensor):
    """An item of an ImageSet as an image: a file (or a sample's) loaded as training loads
    it; an RGB array or a tensor as it is."""
    if isinstance(item, Sample):
        item = item.path
    return load_image(item) if isinstance(item, str | Path) else item


class ImageSet(Dataset):
    """What scoring reads: (tensor, index, error) for each of `items` (image files, samples,
    decoded RGB arrays such as face crops, or inputs already made: `transform` None),
    optionally corrupted first (`perturb`, a robustness sweep's); `load` makes an item an
    image when it is neither (a self-blend drawn on demand). A file that cannot be read
    gives a blank `size` x `size` tensor and its reason, never an exception, so one bad
    file does not stop a batch. `labels` (fake = 1) are known for a labelled set."""

    def __init__(self, items: Sequence, transform: Callable | None = None, size: int = 0,
                 perturb: Perturb | None = None, load: Callable | None = None,
                 labels: Sequence[int] | None = None):
        self.items, self.transform, self.size = list(items), transform, size
        self.perturb, self.load = perturb, load or _rgb
        self.labels = None if labels is None else np.asarray(labels, dtype=int)

    @classmethod
    def of(cls, labelled: LabelledSet | Sequence[Sample], transform: Callable, size: int,
           perturb: Perturb | None = None) -> ImageSet:
        """The images of a labelled set, with their labels."""
        samples = list(getattr(labelled, "samples", labelled))
        return cls(samples, transform, size, perturb, labels=[s.label for s in samples])

    @property
    def samples(self) -> list[Sample]:
        """The labelled samples it reads ([] when its items are not samples)."""
        return list(self.items) if self.items and isinstance(self.items[0], Sample) else []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.load(self.items[index])
        except ImageLoadError as error:
            return torch.zeros(3, self.size, self.size), index, error.reason
        if self.perturb is not None:
            image = self.perturb(image)
        return (image if self.transform is None else self.transform(image)), index, ""


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
    """The validation loader of a TrainParams: the split's val images, not augmented, as
    scoring reads them (with their labels)."""
    val = ImageSet.of(read_manifest(params.data_dir, "val"),
                      eval_transform(params.image_size, params.arch), params.image_size)
    return make_loader(val, params.batch_size, False, params.num_workers, params.seed)


def train_val_loaders(params: TrainParams) -> tuple[DataLoader, DataLoader]:
    """The training loader (augmented, shuffled) and the validation loader of a TrainParams.
    Training reads only the train split, validation only val: never test."""
    train = ManifestDataset(read_manifest(params.data_dir, "train"), train_transform(params))
    return (make_loader(train, params.batch_size, True, params.num_workers, params.seed),
            val_loader(params))
