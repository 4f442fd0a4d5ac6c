"""Faces in photos and clips: dlib's HOG detector and its 68-point landmark model (shipped
by the face-recognition-models package; trained on iBUG 300-W, whose terms exclude
commercial use), the most confident face of each frame cropped square with a margin.

Every detector in this field first samples frames, finds the face and crops it with a
margin, and only then classifies; `faces_of` does that for one file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from dfutils.datasets import is_clip
from dfutils.frames import ahead, bounded, read_frames
from dfutils.images import load_image
from dfutils.params import FacesParams


class ModelsMissing(ValueError):
    """The face models are not installed."""


def model_file(name: str) -> Path:
    """A dlib model file shipped by face-recognition-models (found without importing it:
    its __init__ needs pkg_resources, which current setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelsMissing("the face models are not installed: run `make setup` (it installs "
                         "face-recognition-models and dlib-bin from requirements.txt)")
    return Path(spec.submodule_search_locations[0]) / "models" / name


@dataclass(frozen=True)
class Face:
    crop: np.ndarray  # face_size x face_size RGB
    box: tuple[int, int, int, int]  # detector box in source pixels: left, top, right, bottom
    score: float  # detector confidence
    landmarks: np.ndarray  # (68, 2) in crop pixels
    rank: int = 0  # its place among the faces kept of its frame (0: the most confident)
    # the 2x3 affine map from the source's pixels to the crop's: what crops its mask alike
    matrix: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(2, 3))


class FaceFinder:
    """dlib's HOG detector with the 68-point landmarks (and the 5-point model to align)."""

    def __init__(self, params: FacesParams):
        import dlib  # heavy, and not needed by the rest of the package

        self.params, self.settings = params, self.settings_of(params)
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks68 = dlib.shape_predictor(str(model_file(
            "shape_predictor_68_face_landmarks.dat")))
        self.landmarks5 = (dlib.shape_predictor(str(model_file(
            "shape_predictor_5_face_landmarks.dat"))) if params.align else None)

    @staticmethod
    def settings_of(params: FacesParams) -> tuple:
        """What a FaceFinder does depends on these parameters alone."""
        return (params.upsample, params.min_score, params.align, params.face_margin,
                params.face_size)

    def detect_all(self, rgb: np.ndarray, upsample: int | None = None, limit: int = 1
                   ) -> list[tuple[object, float, np.ndarray]]:
        """The faces of an RGB image as dlib's box, its score and the 68 landmarks in the
        image's pixels: the most confident (the largest on a tie), then, up to `limit`, the
        next most confident of those at least half the size of the largest (the faces the
        SBI video rule reads)."""
        upsample = self.params.upsample if upsample is None else upsample
        rects, scores, _ = self.detector.run(rgb, upsample, self.params.min_score)
        order = sorted(range(len(rects)), key=lambda i: (scores[i], rects[i].area()),
                       reverse=True)
        largest = max((rects[i].area() for i in order), default=0)
        kept = order[:1] + [i for i in order[1:] if rects[i].area() >= largest / 2]
        return [(rects[i], float(scores[i]), np.array(
            [(p.x, p.y) for p in self.landmarks68(rgb, rects[i]).parts()], np.float64))
            for i in kept[:limit]]

    def detect(self, rgb: np.ndarray, upsample: int | None = None
               ) -> tuple[object, float, np.ndarray] | None:
        """The most confident face of an RGB image (`detect_all`'s first), or None."""
        found = self.detect_all(rgb, upsample)
        return found[0] if found else None

    def faces(self, rgb: np.ndarray, limit: int = 1) -> list[Face]:
        """The faces of an RGB frame (`detect_all`), cropped, ranked."""
        return [self.crop(rgb, found, rank)
                for rank, found in enumerate(self.detect_all(rgb, limit=limit))]

    def __call__(self, rgb: np.ndarray) -> Face | None:
        """The most confident face of an RGB frame, cropped; or None."""
        found = self.faces(rgb)
        return found[0] if found else None

    def crop(self, rgb: np.ndarray, found: tuple[object, float, np.ndarray], rank: int = 0
             ) -> Face:
        """One face of `detect_all`, cropped square with the margin (and aligned)."""
        rect, score, points = found
        eyes = None
        if self.landmarks5 is not None:  # points 0-1 and 2-3 are the corners of each eye
            five = np.array([(p.x, p.y) for p in self.landmarks5(rgb, rect).parts()], np.float64)
            eyes = (five[0:2].mean(axis=0), five[2:4].mean(axis=0))
        box = (rect.left(), rect.top(), rect.right(), rect.bottom())
        # dlib's box is tight (the chin often lies below it): frame the box and the
        # landmarks together, so the crop holds every landmark.
        extent = (min(box[0], points[:, 0].min()), min(box[1], points[:, 1].min()),
                  max(box[2], points[:, 0].max()), max(box[3], points[:, 1].max()))
        matrix = crop_matrix(extent, self.params.face_margin, self.params.face_size, eyes)
        crop = cv2.warpAffine(rgb, matrix, (self.params.face_size,) * 2, flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_CONSTANT)
        return Face(crop, box, score, points @ matrix[:, :2].T + matrix[:, 2], rank, matrix)


def crop_mask(mask: np.ndarray, face: Face, size: int) -> np.ndarray:
    """A frame's grey-level mask (the source's pixels) cropped exactly as its face was:
    0 or 255, thresholded at half (a mask video's compression blurs its edges)."""
    warped = cv2.warpAffine(mask, face.matrix, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT)
    return np.where(warped >= 128, 255, 0).astype(np.uint8)


def crop_matrix(box: tuple[float, float, float, float], margin: float, size: int,
                eyes: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The 2x3 affine map from source pixels to a size x size crop: a square `margin` times
    the box's larger side around its centre, turned so the eyes are level when given.

    One map for both cases keeps the crop and its landmarks in step; pixels outside the
    frame come out black.
    """
    left, top, right, bottom = box
    centre = ((left + right) / 2, (top + bottom) / 2)
    side = margin * max(right - left, bottom - top, 1)
    angle = 0.0
    if eyes is not None:
        (lx, ly), (rx, ry) = sorted(eyes, key=lambda e: e[0])
        angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
    matrix = cv2.getRotationMatrix2D(centre, angle, size / side)
    matrix[:, 2] += np.array([size / 2, size / 2]) - centre
    return matrix


class Found(NamedTuple):
    faces: list[tuple[int, Face]]  # (frame index, face), the box in the source's pixels,
    # a frame's faces one after another
    n_frames: int  # frames read (a photo is frame 0)
    scale: float  # the smallest scale `bounded` applied before detection (1.0: none)


def faces_of(path: Path, finder: FaceFinder, frames_per_video: int,
             each: Callable[[int, Face], None] | None = None, max_faces: int = 1) -> Found:
    """The faces of one photo or clip (up to `max_faces` of each frame of a clip, a photo's
    most confident); `each(index, face)` hears each one as it is found. UnreadableClip or
    ImageLoadError when the file cannot be read."""
    clip = is_clip(path)
    if clip:
        frames = ahead(read_frames(path, frames_per_video))
    else:
        photo, scale = bounded(np.asarray(load_image(path)))
        frames = iter([(0, photo, scale)])
    found, n_frames, smallest = [], 0, 1.0
    for index, rgb, scale in frames:
        n_frames, smallest = n_frames + 1, min(smallest, scale)
        for face in finder.faces(rgb, max_faces if clip else 1):
            if scale != 1.0:  # the box and the map in the source's pixels
                face = dataclasses.replace(face, box=tuple(round(v / scale) for v in face.box),
                                           matrix=face.matrix * [[scale, scale, 1]])
            found.append((index, face))
            if each is not None:
                each(index, face)
    return Found(found, n_frames, smallest)
