"""Scoring: P(fake) of a set of images by a model, the one path that validation, predict,
evaluate and the benchmark take.

The images come as a `data.ImageSet` (files, labelled samples, decoded face crops, made
on demand, optionally corrupted) or as a loader over one; `score` runs them through the
one forward pass (`model.forward`) a batch at a time and hands each batch to `on_batch`
as it comes (the benchmark streams its rows so). An image that cannot be read gets its
reason instead of a score, and the rest are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dfutils import distributed
from dfutils.corruptions import Perturb
from dfutils.data import ImageSet, eval_transform
from dfutils.model import Checkpoint, for_inference, forward
from dfutils.params import Amp
from dfutils.progress import tqdm


@dataclass
class Scores:
    """What `score` found, one entry per image in the set's order."""

    logits: np.ndarray  # float32; NaN where the image could not be read
    p_fake: np.ndarray  # float32 sigmoid of the logits
    errors: list[str]  # why an image could not be scored ("" when it was)

    @property
    def ok(self) -> np.ndarray:
        """Which images were scored."""
        return np.array([not e for e in self.errors], dtype=bool)


# on_batch(indices, P(fake), errors): one batch as it is scored
OnBatch = Callable[[list[int], np.ndarray, list[str]], None]


def images_for(checkpoint: Checkpoint, items: Sequence, perturb: Perturb | None = None,
               labels: Sequence[int] | None = None) -> ImageSet:
    """Items as a checkpoint's network sees them: its input size and normalisation."""
    return ImageSet(items, eval_transform(checkpoint.image_size, checkpoint.arch.name),
                    checkpoint.image_size, perturb, labels=labels)


def score(model: nn.Module | Checkpoint, images: ImageSet | DataLoader, *,
          batch_size: int | None = None, num_workers: int = 0,
          device: torch.device | None = None, amp: Amp = "off", desc: str = "scoring",
          on_batch: OnBatch | None = None) -> Scores:
    """P(fake) of every image of `images`, in its order. An ImageSet is read `batch_size`
    at a time by `num_workers` processes; a loader as it is (training's: each torchrun
    rank scores its share, and every rank gets the whole set's scores)."""
    model = model.model if isinstance(model, Checkpoint) else model
    device = device or distributed.device()
    if isinstance(images, DataLoader):
        loader = images
    else:
        if batch_size is None:
            raise TypeError("score() needs batch_size for a set of images")
        loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
    # Outside inference_mode: weights converted inside it become inference tensors, which
    # Grad-CAM (it needs a graph) could no longer use after scoring.
    for_inference(model, device)
    parts = []
    with torch.inference_mode():
        for inputs, indices, errors in tqdm(loader, desc=desc, unit="batch", leave=False,
                                            **distributed.quiet_unless_main()):
            logits, p_fake = (t.cpu().numpy() for t in forward(model, inputs, device, amp))
            parts.append((logits, p_fake, indices.numpy(), np.array(errors, dtype=object)))
            if on_batch is not None:
                on_batch(indices.tolist(), p_fake, list(errors))
    n = len(loader.dataset)
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [
        np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, int),
        np.zeros(0, object)]
    logits, p_fake, indices, errors = distributed.gather_arrays(*columns)
    # DistributedSampler pads the last round with repeats: each image once.
    indices, first = np.unique(indices, return_index=True)
    found = np.array([not e for e in errors[first]], dtype=bool)
    result = Scores(np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32), [""] * n)
    result.logits[indices[found]] = logits[first][found]
    result.p_fake[indices[found]] = p_fake[first][found]
    for i, error in zip(indices, errors[first], strict=True):
        result.errors[i] = error
    return result
