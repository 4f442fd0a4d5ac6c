"""The corruptions a robustness sweep applies to an image before it is scored: JPEG
re-encoding, Gaussian blur and downscaling, each at its levels; all in memory."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageFilter

Perturb = Callable[[Image.Image], Image.Image]
SWEEPS: dict[str, tuple] = {
    "jpeg": (100, 90, 75, 50, 30),  # re-encoding quality
    "blur": (0, 1, 2, 3),  # Gaussian sigma, pixels
    "downscale": (1, 0.5, 0.25),  # scale factor, resized back to the original size
}


def jpeg(quality: int) -> Perturb:
    """Re-encode as JPEG at `quality` (in memory)."""
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(buffer).convert("RGB")
    return apply


def blur(sigma: float) -> Perturb:
    """Gaussian blur with standard deviation `sigma` pixels (0: unchanged)."""
    return (lambda image: image) if sigma == 0 else (
        lambda image: image.filter(ImageFilter.GaussianBlur(radius=sigma)))


def downscale(factor: float) -> Perturb:
    """Shrink by `factor` and resize back: the detail a small upload or a thumbnail loses."""
    def apply(image: Image.Image) -> Image.Image:
        if factor == 1:
            return image
        w, h = image.size
        small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))),
                             Image.Resampling.BICUBIC)
        return small.resize((w, h), Image.Resampling.BILINEAR)
    return apply


PERTURBATIONS: dict[str, Callable[[float], Perturb]] = {"jpeg": jpeg, "blur": blur,
                                                        "downscale": downscale}
