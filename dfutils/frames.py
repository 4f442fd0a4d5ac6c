"""Frames of video clips, decoded with OpenCV's bundled FFmpeg: k evenly spaced frames of a
clip, walked with grab() and decoded with retrieve() only where chosen (frame-exact, and
cheaper than seeking), each scaled down when it is larger than 4K, decoded ahead of their
consumer by a thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


class UnreadableClip(ValueError):
    """A clip that cannot be decoded, or whose frames are over the pixel cap; `reason` says
    why without the path."""

    @property
    def reason(self) -> str:
        return str(self)


def sample_indices(n_frames: int, k: int) -> list[int]:
    """k frame indices evenly spaced over a clip, first and last included; every frame once
    when the clip has k or fewer."""
    if n_frames <= k:
        return list(range(n_frames))
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, k)})


# Frames above this many pixels are scaled down (INTER_AREA) before detection, so a
# process's memory is bounded whatever the clip: 3840 x 2160 (4K UHD) passes unchanged.
# Frames above Pillow's limit, the cap photos have (data.load_image), are not decoded.
DETECT_PIXELS = 3840 * 2160


def bounded(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """A frame scaled down to at most DETECT_PIXELS, and the scale applied (1.0: none)."""
    height, width = frame.shape[:2]
    if height * width <= DETECT_PIXELS:
        return frame, 1.0
    scale = (DETECT_PIXELS / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), size[0] / width


def read_frames(path: Path, k: int) -> Iterator[tuple[int, np.ndarray, float]]:
    """(index, RGB frame, scale) for k evenly spaced frames of a clip, each `bounded`;
    UnreadableClip if unreadable or if its frames are over the pixel cap.

    The frame count comes from the container; a truncated clip ends early, and yields
    the chosen frames it has.
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UnreadableClip("not a video OpenCV can open (empty, corrupt or another format)")
        n_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if n_frames <= 0:
            raise UnreadableClip("the clip has no frames")
        width, height = (int(capture.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH,
                                                        cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise UnreadableClip(f"frames of {width} x {height} pixels are over the cap of "
                             f"{Image.MAX_IMAGE_PIXELS:,} that photos have too: scale the clip "
                             "down (ffmpeg -vf scale=3840:-2)")
        for index, frame in _walk(capture, sample_indices(n_frames, k)):
            frame, scale = bounded(frame)
            yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), scale
    finally:
        capture.release()


def _walk(capture: cv2.VideoCapture, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR frame) of the wanted frames, in order: every frame grabbed, only the
    wanted ones decoded; a clip that ends early yields those it has."""
    chosen, index = set(wanted), 0
    last = max(wanted, default=-1)
    while index <= last and capture.grab():
        if index in chosen:
            ok, frame = capture.retrieve()
            if ok:
                yield index, frame
        index += 1


def clip_shape(path: Path) -> tuple[int, int, int]:
    """A clip's frame count, width and height as its container says; UnreadableClip if it
    cannot be opened."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UnreadableClip("not a video OpenCV can open (empty, corrupt or another format)")
        return tuple(int(capture.get(p)) for p in (
            cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()


def gray_frames(path: Path, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, grey levels at full size) of the wanted frames of a clip (a mask video), in
    order; those past its end are not yielded."""
    capture = cv2.VideoCapture(str(path))
    try:
        for index, frame in _walk(capture, sorted(set(wanted))):
            yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    finally:
        capture.release()


def ahead(frames: Iterator, depth: int = 2) -> Iterator:
    """The items of `frames`, produced by a thread up to `depth` ahead of the consumer.

    OpenCV lets go of the GIL while it decodes, so a clip's next frames are decoded while
    dlib looks for the face in this one. The thread stops when the consumer does.
    """
    out: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def offer(item: object, error: BaseException | None = None) -> bool:
        """Put (item, error) on the queue unless the consumer stops first."""
        while not stop.is_set():
            try:
                out.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in frames:
                if not offer(item):
                    return
            offer(end)
        except BaseException as error:  # handed to the consumer, raised there
            offer(end, error)
        finally:  # the clip is released here, in the thread that read it
            getattr(frames, "close", lambda: None)()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
