"""Images from files: an RGB image exactly as training loads it, whatever the file holds, and
a ground-truth mask. Any failure is an ImageLoadError with a reason, never a traceback
from deep inside Pillow.
"""

from __future__ import annotations

import os
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageLoadError(OSError):
    """A file that cannot be loaded as an image; `reason` says why without the path."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.reason = reason


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
