"""Grad-CAM for a one-logit real/fake model, batched, with its faithfulness and localization
checks (the 03-gradcam step that reports them is `dfutils.gradcam`).

pytorch-grad-cam (the reference the tests compare against) handles a one-logit model with
its BinaryClassifierOutputTarget; what this module adds for this project:

- the three targets on one logit z, the log-odds of fake: evidence *for fake* is the
  gradient of z, *for real* the gradient of -z, and "predicted" picks per image;
- speed: the layers before the target layer run without a graph, and autograd is asked
  for the gradient at that layer only (docs/performance.md measures it against the
  reference);
- frozen backbones: with requires_grad off everywhere before the head, the target layer's
  output carries no graph and its gradient never arrives; we make the captured activation
  a leaf that requires grad, so the gradient reaches it whatever the parameters' flags;
- the checks: deletion against random maps, and localization (pointing game, IoU) against
  ground-truth and self-blend masks, random maps drawn on the explained layer's grid;
- colours: maps are plain [0, 1] arrays; turning them into RGB pixels is `viz.colorize`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dfutils import archs, viz
from dfutils.data import eval_transform
from dfutils.images import load_image
from dfutils.metrics import mean_intervals
from dfutils.model import Checkpoint, forward
from dfutils.params import CamLayer, CamTarget, choices
from dfutils.progress import tqdm

TARGETS = choices(CamTarget)
DELETION_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # of the pixels removed, top first


@dataclass
class CamResult:
    maps: np.ndarray  # (N, H, W) float32 in [0, 1], at the input's size
    p_fake: np.ndarray  # (N,) P(fake)
    explained: np.ndarray  # (N,) 1 where the map explains "fake", 0 where it explains "real"
    grid: tuple[int, int]  # the target layer's resolution, before upsampling


def _signs(logits: torch.Tensor, target: str) -> torch.Tensor:
    """+1 to explain fake (the logit), -1 to explain real (the negated logit)."""
    if target == "fake":
        return torch.ones_like(logits)
    if target == "real":
        return -torch.ones_like(logits)
    if target == "predicted":
        return torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype)
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def upsample(maps: torch.Tensor, size: tuple[int, int], stride: int,
             offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Maps on a layer's grid (N, h, w) to the input's size (N, H, W), bilinear and
    registered: cell (i, j) of a layer of total stride s looks at the input around pixel
    (s i + offset[0], s j + offset[1]) (`Arch.offset`: 0 for torchvision's CNNs, whose
    convolutions pad their odd kernels alike on both sides; a patch's centre for a
    transformer's tokens). Plain resizing (F.interpolate, cv2.resize) puts the cell at the
    centre of the s x s block it stands for instead, half a cell too far right and down on
    those CNNs: 7.5 px at stride 16, 15.5 px at stride 32 (docs/gradcam.md has the
    measurement). Beyond the first and last cells the map keeps its edge value."""
    n, h, w = maps.shape

    def axis(pixels: int, cells: int, shift: float) -> torch.Tensor:
        at = (torch.arange(pixels, dtype=maps.dtype, device=maps.device) - shift) / stride
        return 2 * at / (cells - 1) - 1 if cells > 1 else torch.zeros_like(at)
    xs, ys = torch.meshgrid(axis(size[1], w, offset[1]), axis(size[0], h, offset[0]),
                            indexing="xy")
    grid = torch.stack([xs, ys], dim=-1).expand(n, -1, -1, -1)
    return F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                         align_corners=True)[:, 0]


def stride_of(pixels: int, cells: int) -> int:
    """The total stride of a layer with `cells` along an input side of `pixels`: the power of
    two nearest their ratio (the registry's strides, for a layer outside it)."""
    return 2 ** round(math.log2(pixels / cells))


def scale_maps(cams: torch.Tensor) -> torch.Tensor:
    """Divide each (ReLU'd) map by its maximum; a map with no positive evidence stays all zero."""
    peak = cams.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(cams.dtype).tiny), 0.0)


class GradCAM:
    """Grad-CAM over a block of the network: a `layer` of its architecture's registry entry
    ("last", "last-1", "last-2"; default "last", ResNet18's `model.layer4[-1]`), or any
    module of it (its cells then placed by `stride_of`); use it as a context manager.

    A transformer's block outputs tokens: they are laid on their patch grid
    (`Arch.to_grid`, the class token dropped) before the gradients are pooled, for the
    activations and the gradients alike. Inside `with GradCAM(model) as cam:` one forward
    hook lives on the block; leaving the block (also by an exception) removes it and
    restores every module's train/eval mode. Parameters' requires_grad flags are never
    touched and no `.grad` is written.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module = "last"):
        self.model = model
        self.named = None if isinstance(layer, nn.Module) else layer
        # A module of a network from elsewhere (a test's) is explained as a CNN's.
        self.arch = archs.of(model) if self.named or hasattr(model, "arch_name") else None
        self.layer = layer if isinstance(layer, nn.Module) else self.arch.cam_layer(model,
                                                                                    layer)
        self._handle = None
        self._capturing = False
        self._activations: torch.Tensor | None = None
        self._modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> GradCAM:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._handle = self.layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Remove the hook and put every module back in the mode it was in."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module, training in self._modes:
            module.train(training)
        self._modes, self._activations = [], None

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self._capturing:
            return output
        # The forward runs under no_grad up to here: nothing before the target layer needs
        # a graph. From here on we record one, starting from a leaf we own, so the gradient
        # reaches the activations even when every parameter is frozen. This is why a
        # forward hook with a tensor leaf is used instead of a module backward hook.
        torch.set_grad_enabled(True)
        self._activations = output.detach().requires_grad_(True)
        return self._activations

    def raw(self, images: torch.Tensor, target: str = "predicted"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ReLU'd maps at the layer's resolution (N, h, w), the logits and the signs used."""
        if self._handle is None:
            raise RuntimeError("use GradCAM inside a `with GradCAM(model) as cam:` block")
        self.model.eval()  # batch statistics would mix the images of a batch
        self._capturing = True
        try:
            with torch.no_grad():
                logits, _ = forward(self.model, images)
            signs = _signs(logits.detach(), target)
            activations = self._activations
            (gradients,) = torch.autograd.grad((logits * signs).sum(), activations)
        finally:
            self._capturing, self._activations = False, None
        size, activations = tuple(images.shape[-2:]), activations.detach()
        if self.arch is not None:
            gradients = self.arch.to_grid(gradients, size)
            activations = self.arch.to_grid(activations, size)
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cams = torch.relu((weights * activations).sum(dim=1))
        return cams, logits.detach(), signs

    def __call__(self, images: torch.Tensor, target: str = "predicted") -> CamResult:
        """Maps at the input's size, scaled to [0, 1] per image, with P(fake)."""
        cams, logits, signs = self.raw(images, target)
        size = tuple(images.shape[-2:])
        if self.named is None:
            stride, offset = stride_of(size[1], cams.shape[-1]), (0.0, 0.0)
        else:
            stride = self.arch.explained(self.named).stride
            offset = tuple(self.arch.offset(self.named, side) for side in size)
        upsampled = upsample(cams, size, stride, offset)
        return CamResult(scale_maps(upsampled).cpu().numpy().astype(np.float32),
                         torch.sigmoid(logits).cpu().numpy(), (signs > 0).cpu().numpy().astype(int),
                         tuple(cams.shape[-2:]))


def random_maps(n: int, size: tuple[int, int], grid: tuple[int, int],
                generator: torch.Generator) -> np.ndarray:
    """Random maps as smooth as a CAM: uniform noise on the layer's grid, upsampled the same
    way (registered as a layer of that grid would be)."""
    noise = torch.rand((n, *grid), generator=generator)
    return upsample(noise, tuple(size), stride_of(size[1], grid[1])).numpy()


def _remove(images: torch.Tensor, maps: np.ndarray, fraction: float, fill: str) -> torch.Tensor:
    """Images with the top `fraction` of pixels by map replaced (per image)."""
    n, _, h, w = images.shape
    k = int(round(fraction * h * w))
    if k == 0:
        return images
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")[:, :k]
    mask = np.zeros((n, h * w), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    mask = torch.from_numpy(mask.reshape(n, 1, h, w)).to(images.device)
    if fill == "mean":
        replacement = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    elif fill == "blur":
        kernel = 2 * (max(h, w) // 8) + 1
        replacement = TF.gaussian_blur(images, [kernel, kernel], [kernel / 4, kernel / 4])
    else:
        raise ValueError(f"fill must be 'mean' or 'blur', got {fill!r}")
    return torch.where(mask, replacement, images)


@torch.no_grad()
def _p_class(model: nn.Module, images: torch.Tensor, explained: np.ndarray) -> np.ndarray:
    p_fake = forward(model, images)[1].cpu().numpy()
    return np.where(explained == 1, p_fake, 1 - p_fake)


def deletion_areas(model: nn.Module, images: torch.Tensor, maps: np.ndarray,
                   explained: np.ndarray, randoms: Sequence[np.ndarray],
                   fractions: Sequence[float] = DELETION_FRACTIONS, fill: str = "mean"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each image's area under P(explained class) as the top fractions of its pixels by CAM
    are removed, and the same averaged over the `randoms` (each a batch of random maps):
    (per image under the CAM, per image under random maps, the two curves per fraction and
    image). Lower is more faithful: the evidence went first."""
    model.eval()
    cam_curves, random_curves = [], []  # per fraction, per image
    for fraction in fractions:
        cam_curves.append(_p_class(model, _remove(images, maps, fraction, fill), explained))
        random_curves.append(np.mean([
            _p_class(model, _remove(images, r, fraction, fill), explained) for r in randoms],
            axis=0))
    span = fractions[-1] - fractions[0]
    cam_curves, random_curves = np.array(cam_curves), np.array(random_curves)
    return (np.trapezoid(cam_curves, fractions, axis=0) / span,
            np.trapezoid(random_curves, fractions, axis=0) / span, cam_curves, random_curves)


def deletion_score(model: nn.Module, images: torch.Tensor, maps: np.ndarray,
                   explained: np.ndarray, fractions: Sequence[float] = DELETION_FRACTIONS,
                   fill: str = "mean", n_random: int = 3, seed: int = 0, *,
                   grid: tuple[int, int], clusters, n_resamples: int) -> dict:
    """How fast P(explained class) falls as the top-k% pixels by CAM are removed, vs random.

    A faithful map points at the evidence, so removing its top pixels should lower the
    probability faster than removing the top pixels of a random map of the same smoothness.
    The area under each curve (over the fractions, normalised to [0, 1]) is reported;
    lower is more faithful. `grid` is the explained layer's resolution (CamResult.grid).
    `ci` holds 95% bootstrap intervals of both areas and of their difference (each image's
    area under the CAM's curve minus under the random maps'; whole videos resampled when
    `clusters` names them): the CAM is more faithful than chance when the difference's
    interval lies below 0.
    """
    size = tuple(images.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    randoms = [random_maps(len(images), size, grid, generator) for _ in range(n_random)]
    per_cam, per_random, cam_curves, random_curves = deletion_areas(
        model, images, maps, explained, randoms, fractions, fill)
    ci = mean_intervals(per_cam, per_random, clusters, n_resamples)
    return {
        "fractions": list(fractions),
        "fill": fill,
        "cam": [float(c.mean()) for c in cam_curves],
        "random": [float(r.mean()) for r in random_curves],
        "auc_cam": float(per_cam.mean()) if len(per_cam) else float("nan"),
        "auc_random": float(per_random.mean()) if len(per_random) else float("nan"),
        "ci": {"auc_cam": ci.get("mean"), "auc_random": ci.get("baseline"),
               "difference": ci.get("difference"),
               **({"unavailable": ci["unavailable"]} if "unavailable" in ci else {})},
    }


def localization_scores(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                        iou_threshold: float = 0.5
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per map and its boolean mask: the pointing game (1 when the map's maximum lies in the
    mask), the IoU of the map's top region (>= iou_threshold of its maximum) with the mask,
    and the share of the map's energy (its sum) inside the mask."""
    hits, ious, energy = [], [], []
    for cam, mask in zip(maps, masks, strict=True):
        hits.append(bool(mask.flat[int(np.argmax(cam))]))
        region = cam >= iou_threshold * cam.max() if cam.max() > 0 else np.zeros_like(mask)
        union = np.logical_or(region, mask).sum()
        ious.append(np.logical_and(region, mask).sum() / union if union else 0.0)
        total = float(cam.sum())
        energy.append(float(cam[mask].sum()) / total if total > 0 else 0.0)
    return np.array(hits, float), np.array(ious, float), np.array(energy, float)


def localization(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 iou_threshold: float = 0.5, n_random: int = 10, seed: int = 0, *,
                 grid: tuple[int, int], clusters, n_resamples: int) -> dict:
    """Pointing game (is the map's maximum inside the mask) and IoU of map >= threshold, vs random.

    `maps` and `masks` pair up; each mask is boolean at its map's size. Random maps are
    drawn on `grid` (the explained layer's resolution) and upsampled alike. `ci` holds 95%
    bootstrap intervals of the pointing game of the CAM, of random maps, and of their
    difference per image (the CAM points better than chance when it lies above 0).
    """
    if len(maps) == 0:
        return {"n": 0}
    generator = torch.Generator().manual_seed(seed)
    hits, iou, _ = localization_scores(maps, masks, iou_threshold)
    random_scores = []
    for _ in range(n_random):
        randoms = [random_maps(1, m.shape, grid, generator)[0]
                   for m in maps]
        random_scores.append(localization_scores(randoms, masks, iou_threshold))
    random_hits = np.mean([h for h, _, _ in random_scores], axis=0)  # per image: a hit rate
    ci = mean_intervals(hits, random_hits, clusters, n_resamples)
    return {
        "n": len(maps),
        "pointing_cam": float(hits.mean()),
        "pointing_random": float(random_hits.mean()),
        "iou_cam": float(iou.mean()),
        "iou_random": float(np.mean([i.mean() for _, i, _ in random_scores])),
        "iou_threshold": iou_threshold,
        "ci": {"pointing_cam": ci.get("mean"), "pointing_random": ci.get("baseline"),
               "difference": ci.get("difference"),
               **({"unavailable": ci["unavailable"]} if "unavailable" in ci else {})},
    }


def verdict(difference: Sequence[float] | None, better_below: bool) -> str:
    """What the 95% interval of a paired difference (CAM minus random maps) says: "better"
    or "worse" than random maps when it excludes 0, "not told apart" when it holds 0, ""
    without one. `better_below`: lower is better (the deletion AUC)."""
    if not difference or any(v is None or np.isnan(v) for v in difference):
        return ""
    low, high = difference if better_below else (-difference[1], -difference[0])
    return "better" if high < 0 else "worse" if low > 0 else "not told apart"


def _rgb(image: str | Path | np.ndarray) -> np.ndarray:
    """An image file loaded as training loads it, or an RGB array (a face crop) as it is."""
    return image if isinstance(image, np.ndarray) else np.asarray(load_image(image))


def explain(checkpoint: Checkpoint, paths: Sequence[str | Path | np.ndarray],
            target: CamTarget = "predicted", batch_size: int = 16, layer: CamLayer = "auto"
            ) -> tuple[torch.Tensor, CamResult]:
    """Grad-CAM of a checkpoint's model for image files (or RGB arrays), in batches: the
    model inputs and the maps at the checkpoint's image size."""
    size, arch = checkpoint.image_size, checkpoint.arch
    layer = arch.layer_for(layer, (size, size))
    transform = eval_transform(size, arch.name)
    inputs = torch.stack([transform(p if isinstance(p, np.ndarray) else load_image(p))
                          for p in paths]) if paths else torch.zeros((0, 3, size, size))
    parts = []
    with GradCAM(checkpoint.model, layer) as cam:
        for start in tqdm(range(0, len(inputs), batch_size), desc="grad-cam", unit="batch",
                          leave=False):
            parts.append(cam(inputs[start:start + batch_size], target))
    grid = arch.grid((size, size), layer)
    if not parts:
        empty = np.zeros(0)
        return inputs, CamResult(np.zeros((0, size, size), np.float32), empty, empty, grid)
    return inputs, CamResult(*(np.concatenate([getattr(p, f) for p in parts])
                               for f in ("maps", "p_fake", "explained")), grid)


def write_overlays(checkpoint: Checkpoint, paths: Sequence[Path | np.ndarray],
                   outputs: Sequence[Path], target: CamTarget = "predicted",
                   layer: CamLayer = "auto", alpha: float = 0.5, batch_size: int = 16,
                   replace: bool = True) -> tuple[CamResult, list[np.ndarray]]:
    """Grad-CAM of each image file (or RGB array) overlaid on it and written as PNG to its
    output path (`replace=False`: an existing file is never overwritten); the maps and the
    overlays."""
    _, cams = explain(checkpoint, paths, target, batch_size, layer)
    overlays = []
    for path, output, cam in zip(paths, outputs, cams.maps, strict=True):
        overlays.append(viz.overlay(_rgb(path), cam, alpha))
        viz.save_rgb(output, overlays[-1], replace)
    return cams, overlays


