"""The self-blend: a fake made from a real image alone, as in Self-Blended Images (Shiohara
and Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR 2022).

A face swap pastes a face into a frame inside a face-shaped region and blends its edge;
whatever made the face, that leaves traces: a blend boundary, and colour and sharpness that
differ inside from outside. A self-blend makes those traces without a second face: a
slightly altered copy of the image (colour, sharpness, a small shift) is blended back into
it inside a soft mask. Training uses the landmark hull of a face as the mask (dfutils.sbi);
the demo data set, whose photographs have no faces, a random smooth blob (dfutils.demo).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # the paper's: a full blend half the time
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


@dataclass(frozen=True)
class Alteration:
    """How strongly the copy is altered before it is blended back. The defaults are the
    paper's (`PAPER`), for faces; the demo's textures need a stronger cue (dfutils.demo)."""

    colour_p: float = 0.3  # the probability of each of the three colour changes
    rgb_shift: tuple[float, float] = (0.0, 20.0)  # the RGB shift's size per channel, in
    # levels: (0, m) draws it from [-m, m]; (a, m) from [a, m] with a random sign
    ratios: tuple[float, ...] = BLEND_RATIOS  # the mask's maximum, drawn from these


PAPER = Alteration()


def colour_shift(image: np.ndarray, rng: np.random.Generator, alteration: Alteration = PAPER
                 ) -> np.ndarray:
    """Each with probability colour_p (the paper's 0.3): an RGB shift (the paper's: up to 20
    levels), a hue, saturation and value change, a brightness and contrast change (up to
    10 %). float32."""
    out = image.astype(np.float32)
    p, (least, most) = alteration.colour_p, alteration.rgb_shift
    if rng.random() < p:
        shift = (rng.uniform(-most, most, 3) if least == 0 else
                 rng.choice([-1, 1], 3) * rng.uniform(least, most, 3))
        out = out + shift.astype(np.float32)
    if rng.random() < p:
        hsv = cv2.cvtColor(np.clip(out, 0, 255) / 255, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-10, 10)) % 360
        hsv[..., 1:] *= rng.uniform(0.85, 1.15, 2).astype(np.float32)
        out = cv2.cvtColor(np.clip(hsv, 0, [360, 1, 1]).astype(np.float32),
                           cv2.COLOR_HSV2RGB) * 255
    if rng.random() < p:
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


def shift(image: np.ndarray, rng: np.random.Generator, centre: np.ndarray, size: float
          ) -> np.ndarray:
    """A small random affine about `centre`: translation up to 3 % of `size` (the face's),
    scale 0.95-1.05."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), 0.0,
                                     rng.uniform(0.95, 1.05))
    matrix[:, 2] += rng.uniform(-0.03, 0.03, 2) * size
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The mask source for an image without landmarks: a smooth random blob in [0, 1], a
    rotated ellipse near the centre (axes 15-32 % of the side), Gaussian-blurred."""
    side = min(shape)
    mask = np.zeros(shape, np.float32)
    centre = (int(shape[1] * rng.uniform(0.3, 0.7)), int(shape[0] * rng.uniform(0.3, 0.7)))
    axes = (int(side * rng.uniform(0.15, 0.32)), int(side * rng.uniform(0.15, 0.32)))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
    mask = cv2.GaussianBlur(mask, (0, 0), side * rng.uniform(0.02, 0.06))
    return mask / max(float(mask.max()), 1e-6)


def self_blend(image: np.ndarray, rng: np.random.Generator,
               landmarks: np.ndarray | None = None, alteration: Alteration = PAPER
               ) -> tuple[np.ndarray, np.ndarray]:
    """A fake made from a real image alone, and its mask.

    `image`: H x W x 3 uint8 RGB. The mask comes from the face's 68 `landmarks` (x, y in
    its pixels: a deformed, twice-blurred hull, as in the paper) or, without them, from a
    random smooth blob (`blob`); either is scaled by a ratio from `alteration.ratios`. The
    altered copy is the same for both: colour-shifted, resampled and moved a little about
    the face (or the image's centre), as strongly as `alteration` says (the paper's by
    default). Returns the self-blend (uint8; pixels where the mask is 0 are
    the original's exactly) and the mask (float32 in [0, 1]: the weight of the altered
    copy). Deterministic for a given `rng`.
    """
    if landmarks is None:
        centre, size = np.array(image.shape[1::-1], np.float64) / 2, float(min(image.shape[:2]))
        mask = blob(image.shape[:2], rng)
    else:
        landmarks = np.asarray(landmarks, dtype=np.float64)
        centre, size = landmarks.mean(axis=0), face_size(landmarks)
        mask = soften(deformed_hull(landmarks, image.shape[:2], rng), rng, size)
    mask *= float(rng.choice(alteration.ratios))
    source = shift(resample(colour_shift(image, rng, alteration), rng), rng, centre, size)
    weight = mask[..., None]
    blended = np.clip(weight * source + (1 - weight) * image + 0.5, 0, 255).astype(np.uint8)
    return np.where(weight > 0, blended, image), mask
