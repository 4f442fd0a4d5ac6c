"""Parameters: one frozen dataclass per notebook and command, the one place where each
parameter's name, type, default, allowed values and help are written.

One coercion path (`Params.coerce`) turns command-line strings and YAML values into them
for `make run-all`, the commands of `python -m dfutils` and the notebooks alike; an unknown
or wrong-typed value is an error that names it (papermill itself only warns, nanoGPT's
configurator refuses). The notebooks' `parameters` cells and the parameter reference in
docs/ are written from these classes by dfutils.notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from dfutils import archs, datasets, metrics
from dfutils.paths import is_plain_name, resolve

# The options with a fixed set of values: the dataclasses, the modules that act on them and
# the command line's `choices` all use these. Where a registry holds the values, they come
# from it: the trainable parts and the Grad-CAM layers from the architectures', the data
# set layouts from the readers.
CamLayer = Literal[("auto", *archs.CAM_LAYERS)]
Amp = Literal["auto", "off", "bf16", "fp16"]
CamTarget = Literal["predicted", "fake", "real"]
Selection = Literal["mixed", "random", "sources"]
ThresholdRule = Literal[metrics.THRESHOLD_RULES]
Schedule = Literal["constant", "cosine"]
OptimizerName = Literal["adam", "sgd"]
GroupBy = Literal["file", "folder"]
Stratify = Literal["class", "source"]
Fakes = Literal["data", "sbi", "sbi+data"]
Monitor = Literal["auto", "val_loss", "val_auc", "sbi_loss", "sbi_auc", "mean_loss", "mean_auc"]
EvalSplit = Literal["", "val", "test"]
Dataset = Literal[tuple(datasets.READERS)]
Compression = Literal["c0", "c23", "c40"]

# Values of `weights` that are not paths: the kinds of published weights, and none.
WEIGHT_NAMES = (*archs.PRETRAINED, "none", "null", "")
# Shorthands accepted on the command line (make run-all EPOCHS=5).
ALIASES = {"epochs": "max_epochs", "model": "model_dir"}
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


class ParameterError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def parse_bool(name: str, text: str) -> bool:
    """A yes/no value typed as text (1/0, true/false, yes/no, any case); anything else is a
    ParameterError naming it."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ParameterError(f"{name} takes true or false (1/0, yes/no), got {text!r}")


def assignment(word: str) -> tuple[str, str]:
    """A `KEY=VALUE` word as (key in lower case, aliases resolved; value as typed)."""
    key, sep, value = word.partition("=")
    if not sep or not key:
        raise ParameterError(f"expected KEY=VALUE, got {word!r}")
    control = next((c for c in word if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise ParameterError(f"{key}= holds a control character ({control!r}): give the "
                             "value on one line, in plain characters")
    return ALIASES.get(key.lower(), key.lower()), value


def choices(kind: Any) -> tuple[str, ...]:
    """The allowed values of a Literal option, e.g. choices(Trainable); () for other types."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def param(default: Any, help: str, path: bool = False, old: dict[str, str] | None = None,
          flags: tuple[str, ...] = ()) -> Any:
    """A parameter's default and one-line help; `path`: it names a file or folder (on the
    command line relative to the working directory, elsewhere to the repository root);
    `old`: values of earlier versions, each accepted as the value it maps to; `flags`:
    other spellings of its option on its step's command (`--run` for a trained run)."""
    metadata = {"help": help, "path": path, "old": old or {}, "flags": flags}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` (ints widened to float where a float is wanted) or raise ParameterError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _check_type(name, value, inner)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or not isinstance(value, str):
            raise ParameterError(f"parameter {name!r} must be one of "
                                 f"{', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ParameterError(f"parameter {name!r} must be a list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be a finite number, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ParameterError(f"parameter {name!r} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ParameterError(
            f"parameter {name!r} must be {annotation.__name__}, got {type(value).__name__} "
            f"{value!r}"
        )
    return value


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """A command-line string or a YAML value as the parameter's type; values that are already
    of it pass through. The one coercion path; `_check_type` then validates."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        (inner,) = [t for t in typing.get_args(annotation) if t is not type(None)]
        return None if value is None else _coerce(name, value, inner)
    if origin is Literal:
        # `threshold: 0.5` in YAML is the rule "0.5": a choice written like a number.
        return str(value) if isinstance(value, int | float) and not isinstance(
            value, bool) and str(value) in typing.get_args(annotation) else value
    if not isinstance(value, str) or annotation is str:
        return value
    if annotation is bool:
        return parse_bool(f"parameter {name!r}", value)
    try:
        if annotation in (int, float):
            return annotation(value)
        if origin is list:
            if typing.get_args(annotation) == (str,) and not value.lstrip().startswith("["):
                return [v.strip() for v in value.split(",") if v.strip()]
            return json.loads(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(
            annotation, "a JSON list like [0.2, 0.2, 0.2, 0.0]")
        raise ParameterError(f"parameter {name!r} takes {kind}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class Params:
    """Base: construction from a mapping or a notebook namespace, with validation."""

    step: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):  # a value of an earlier version: the one it means now
                value = f.metadata["old"].get(value, value)
            object.__setattr__(self, f.name, _check_type(f.name, value, hints[f.name]))
        self.check()

    def check(self) -> None:
        """Range checks of a subclass; raise ParameterError."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    @classmethod
    def current(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Recorded values with those of earlier versions given as what they mean now
        (`param`'s `old`): "fc" as "head", say."""
        old = {f.name: f.metadata["old"] for f in dataclasses.fields(cls)}
        return {k: old.get(k, {}).get(v, v) if isinstance(v, str) else v
                for k, v in values.items()}

    @classmethod
    def coerce(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Strings (command line) and YAML values as each known parameter's type; names this
        class does not have pass through unchanged (from_mapping refuses them)."""
        hints = typing.get_type_hints(cls)
        return {k: _coerce(k, v, hints[k]) if k in hints else v for k, v in values.items()}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Params:
        """Build from a dict of typed values; unknown keys are an error."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {', '.join(map(repr, unknown))} for {cls.step}; "
                f"known: {', '.join(cls.names())}"
            )
        return cls(**values)

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> Params:
        """The parameters a record holds (a report's, a checkpoint's), what it holds of
        other steps or versions passed over."""
        return cls.from_mapping({k: v for k, v in cls.current(values).items()
                                 if k in cls.names()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FacesParams(Params):
    """00-faces: crop the faces of the photos and clips of raw_dir (or of a data set)."""

    step: ClassVar[str] = "00-faces"

    raw_dir: str = param("dataset_raw", "photos and/or video clips: raw_dir/real and "
                         "raw_dir/fake, any depth; or the root of the data set named by "
                         "dataset (read only)", path=True)
    dataset: Dataset = param("folder", "how raw_dir is laid out: real/ + fake/ folders, or "
                             "FaceForensics++, its DeepFakeDetection part, Celeb-DF (v1 or v2) "
                             "or DFDC as published (docs/datasets.md)")
    methods: str = param("", "ffpp: the manipulations to read, comma-separated (Deepfakes, "
                         "Face2Face, FaceSwap, NeuralTextures, FaceShifter); empty: every one "
                         "present")
    compression: Compression = param("c23", "ffpp and dfd: the compression level read")
    faces_dir: str = param("data/faces", "where the crops, faces.csv and faces_report.json "
                           "are written (same real/fake layout)", path=True)
    frames_per_video: int = param(32, "frames sampled from each clip, evenly spaced")
    face_margin: float = param(1.3, "the square crop is this many times the face (its box "
                               "and landmarks together)")
    face_size: int = param(256, "crops are resized to face_size x face_size")
    upsample: int = param(0, "times the detector upsamples each frame: 1 or 2 find smaller "
                          "faces, slower")
    min_score: float = param(0.0, "detector score a face needs (dlib's adjust_threshold)")
    align: bool = param(False, "turn each crop so the eyes are level (5-point model)")
    max_faces: int = param(1, "faces kept per frame of a clip: 1 keeps the most confident "
                           "(what training wants); more keeps up to that many, the most "
                           "confident first, of those at least half the size of the frame's "
                           "largest (the faces the SBI video rule reads: DFDC's two-person "
                           "clips, for test sets)")
    overwrite: bool = param(False, "replace faces made with other parameters")

    def check(self) -> None:
        if (self.frames_per_video < 1 or self.face_size < 32 or self.upsample < 0
                or self.max_faces < 1):
            raise ParameterError("frames_per_video and max_faces must be >= 1, face_size >= 32 "
                                 "and upsample >= 0")
        if self.face_margin < 1.0:
            raise ParameterError(f"face_margin must be >= 1 (the crop holds the whole face), "
                                 f"got {self.face_margin}")
        unknown = [m for m in self.methods.split(",")
                   if m.strip() and m.strip() not in datasets.FFPP_METHODS]
        if unknown:
            raise ParameterError(f"methods: {unknown[0].strip()!r} is not an FF++ manipulation; "
                                 f"choose among {', '.join(datasets.FFPP_METHODS)}")
        if self.methods and self.dataset != "ffpp":
            raise ParameterError(f"methods applies to dataset=ffpp only, not {self.dataset}")


@dataclass(frozen=True)
class SplitParams(Params):
    """01-split: turn dataset_raw/{real,fake} into data/{train,val,test}/{real,fake}."""

    step: ClassVar[str] = "01-split"

    raw_dir: str = param("dataset_raw", "the user's images: raw_dir/real and raw_dir/fake "
                         "(read only)", path=True)
    data_dir: str = param("data", "where train/, val/, manifest.csv and split_report.json are "
                          "written", path=True)
    val_fraction: float = param(0.2, "validation share of each class")
    test_fraction: float = param(0.0, "test share of each class (real/ + fake/ only: a "
                                 "published data set brings its official test split)")
    seed: int = param(42, "seeds the content-hash ranking that assigns each image to a split")
    overwrite: bool = param(False, "replace an existing split that was made with other "
                            "parameters")
    group_by: GroupBy = param("file", "what stays in one split: an image and its exact "
                              "duplicates, or every image of a folder (a clip's frames)")
    group_pattern: str = param("", "a regular expression: images whose paths below the class "
                               "folder give the same match (its first group) stay in one "
                               "split, real and fake alike (pairs of one scene)")
    stratify: Stratify = param("class", "what each share is taken from: each class's groups, "
                               "or each class's groups in each source folder (the first "
                               "folder below real/ and fake/: the data sets of a combined split)")

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ParameterError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 - self.val_fraction:
            raise ParameterError(f"test_fraction must be >= 0 and leave room for training "
                                 f"(test_fraction + val_fraction < 1), got {self.test_fraction}")
        try:
            re.compile(self.group_pattern)
        except re.error as error:
            raise ParameterError(f"group_pattern {self.group_pattern!r} is not a regular "
                                 f"expression: {error}") from None


def bootstrap_param(what: str) -> Any:
    """The `n_bootstrap` option of every step that reports an interval: `what` it bounds."""
    return param(1000, f"resamples of the 95% bootstrap intervals of {what} (whole videos "
                 "when images belong to clips)")


def trained_run_param() -> Any:
    """The `run_dir` option of every step that reads a trained run (`--run` on its
    command)."""
    return param("runs/notebook", "a trained run (model.pt)", path=True, flags=("--run",))


def command_run_param() -> Any:
    """The `run_dir` option of a command that reads a trained run and is not a step of the
    chain (predict, export, app): no default, `--run`."""
    return param("", "a trained run (model.pt)", path=True, flags=("--run",))


def model_dir_param() -> Any:
    """The `model_dir` option of every step that scores with a trained model (`--model`)."""
    return param("", "an exported detector (`dfutils export`) to score with instead of the "
                 "run's model.pt", path=True)


def onnx_param() -> Any:
    """The `onnx` option of every step that scores with an exported detector."""
    return param(False, "with model_dir: score through ONNX Runtime (its model.onnx) instead "
                 "of PyTorch")


def check_onnx(params: Params) -> None:
    """`onnx` scores an exported folder's model.onnx: it needs `model_dir`."""
    if params.onnx and not params.model_dir:
        raise ParameterError("onnx scores an exported detector's model.onnx: give model_dir "
                             "(--model <folder>; `dfutils export --onnx` writes one)")


def cam_layer_param() -> Any:
    """The `layer` option of every step that explains with Grad-CAM."""
    return param("auto", "the block Grad-CAM explains: the last block of the network's last "
                 "stage, or of the stage before it (last-1) or before that (last-2); auto: the "
                 "deepest whose grid is at least 6 x 6 at the run's image size (layer4, layer3 "
                 "and layer2 mean last, last-1 and last-2)", old=archs.OLD_NAMES["layer"])


def batch_param() -> Any:
    """The `batch_size` option of every step that scores images."""
    return param(32, "images per forward pass")


def workers_param() -> Any:
    """The `num_workers` option of every step that scores images."""
    return param(2, "image-loading processes (0: load in this process)")


def amp_param() -> Any:
    """The `amp` option of every step that runs the model forward (Grad-CAM runs in float32)."""
    return param("auto", "mixed precision: auto is bf16 on a GPU that has it, fp16 (with loss "
                 "scaling in training) on one that does not, off on the CPU")


@dataclass(frozen=True)
class TrainParams(Params):
    """02-train: fit the network (`arch`) with a one-logit head (log-odds of fake)."""

    step: ClassVar[str] = "02-train"

    data_dir: str = param("data", "a split made by 01-split", path=True)
    run_dir: str = param("runs/notebook", "where the model, history, metrics and figures go",
                         path=True)
    weights: str | None = param("imagenet", "the architecture's published weights by what "
                                f"they were trained on ({' or '.join(archs.PRETRAINED)}: "
                                "docs/training.md), a weights file, or None (random init)",
                                path=True)
    trainable: str = param("head", "what trains: head (the head alone on a frozen backbone: "
                           "the original recipe, a linear probe), norm (the normalisation "
                           "layers and the head), last (the network's last stage, or a "
                           "transformer's last block, with the head), last:k (its last k "
                           "stages or blocks), all (fc and layer4 mean head and last)",
                           old=archs.OLD_NAMES["trainable"])
    image_size: int = param(224, "images are resized to image_size x image_size")
    batch_size: int = param(32, "images per optimisation step")
    max_epochs: int = param(20, "upper bound; early stopping usually ends sooner")
    lr: float = param(1e-4, "learning rate")
    patience: int = param(3, "epochs without a better monitored value (see monitor) before "
                          "stopping")
    min_delta: float = param(0.0, "how much better the monitored value must be to count as "
                             "better")
    seed: int = param(42, "seeds initialisation, shuffling and augmentation")
    num_workers: int = param(2, "DataLoader worker processes (0: load in this process)")
    jitter: list[float] = param([0.2, 0.2, 0.2, 0.0], "ColorJitter brightness, contrast, "
                                "saturation, hue")
    flip: bool = param(True, "random horizontal flips")
    crop_scale: float = param(1.0, "< 1: random resized crops covering at least this share of "
                              "the image")
    mixup: float = param(0.0, "> 0: mixup of images and labels, weights drawn from "
                         "Beta(mixup, mixup)")
    erasing: float = param(0.0, "probability of erasing one random rectangle of a training "
                           "image")
    label_smoothing: float = param(0.0, "> 0: training targets 0/1 become eps/2 and 1 - eps/2")
    ema: float = param(0.0, "> 0: validate and keep a moving average of the weights (decay "
                       "per step)")
    jpeg_prob: float = param(0.0, "probability of a random JPEG re-encoding (quality 30-100) "
                             "per image")
    blur_prob: float = param(0.0, "probability of a random Gaussian blur (sigma 0.1-3) per "
                             "image")
    threshold: ThresholdRule = param("0.5", "decision threshold on P(fake): fixed 0.5, or the "
                                     "validation EER point")
    schedule: Schedule = param("constant", "learning rate: constant (the original recipe) or "
                               "cosine decay to zero")
    optimizer: OptimizerName = param("adam", "Adam (the original recipe) or SGD with Nesterov "
                                     "momentum 0.9")
    weight_decay: float = param(0.0, "Adam: > 0 uses AdamW (decoupled); SGD: L2 penalty")
    feature_cache: bool = param(True, 'trainable "head" without augmentation: run the frozen '
                                "backbone once")
    resume: bool = param(False, "continue an interrupted run from run_dir/last.pt, to the "
                         "history it would have had")
    fakes: Fakes = param("data", 'the training fakes: the split\'s fake images; "sbi": a '
                         "self-blend of each real face, made on the fly (real fakes then only "
                         'validate); "sbi+data": both in each batch (sbi_share)')
    sbi_share: float = param(0.5, "the share of the fakes in each batch that are self-blends "
                             "of its reals, the others being fake images of the split (with "
                             'fakes="sbi+data")')
    monitor: Monitor = param("auto", "what early stopping and the kept epoch follow: auto is "
                             'sbi_loss with fakes="sbi", mean_loss (of the split\'s validation '
                             'set and the self-blends) with "sbi+data", else val_loss')
    arch: str = param(archs.DEFAULT, "the network: "
                      f"{', '.join(archs.ARCHS)} (docs/training.md)")
    n_bootstrap: int = bootstrap_param("the validation metrics in metrics.json")
    amp: Amp = amp_param()
    compile: bool = param(False, "torch.compile the model before training (slow to start; "
                          "pays off on long GPU runs)")
    tensorboard: bool = param(True, "write TensorBoard event files into run_dir/tensorboard "
                              "(losses, AUCs, lr, images/s each epoch; ROC and Grad-CAM grid): "
                              "make tensorboard RUN=<run>")

    @property
    def augmented(self) -> bool:
        return bool(any(self.jitter) or self.flip or self.jpeg_prob or self.blur_prob
                    or self.crop_scale < 1 or self.mixup > 0 or self.erasing > 0)

    @property
    def caches_features(self) -> bool:
        """Whether fit trains the head on backbone features computed once (same result).
        Never with self-blends: each epoch's blends are new, so its features are too."""
        return (self.feature_cache and self.trainable == "head" and not self.augmented
                and self.fakes == "data")

    @property
    def monitored(self) -> str:
        """The history column early stopping follows (lower is better for losses)."""
        if self.monitor == "auto":
            return {"sbi": "sbi_loss", "sbi+data": "mean_loss"}.get(self.fakes, "val_loss")
        return self.monitor

    @property
    def self_blends(self) -> bool:
        """Whether training makes self-blends (and validates on the fixed ones too)."""
        return self.fakes in ("sbi", "sbi+data")

    def check(self) -> None:
        for name in ("image_size", "batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ParameterError(f"image_size must be at least 32 px, got {self.image_size}")
        if self.n_bootstrap < 1:
            raise ParameterError(f"n_bootstrap must be at least 1, got {self.n_bootstrap}")
        if self.patience < 0 or self.num_workers < 0 or self.min_delta < 0:
            raise ParameterError("patience, num_workers and min_delta must not be negative")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ParameterError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                                 f"{self.weight_decay}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ParameterError(
                "jitter must be [brightness, contrast, saturation, hue], each >= 0 and "
                f"hue <= 0.5; got {self.jitter}"
            )
        if self.mixup < 0:
            raise ParameterError(f"mixup must be >= 0, got {self.mixup}")
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ParameterError(f"crop_scale must be in [0.05, 1], got {self.crop_scale}")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.ema < 1.0:
            raise ParameterError("label_smoothing and ema must be in [0, 1), got "
                                 f"{self.label_smoothing} and {self.ema}")
        for name in ("jpeg_prob", "blur_prob", "erasing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParameterError(f"{name} must be a probability, got {getattr(self, name)}")
        try:
            entry = archs.get(self.arch)
        except archs.UnknownArch as error:
            raise ParameterError(f"parameter 'arch': {error}") from None
        why = entry.check_trainable(self.trainable) or entry.check_size(self.image_size)
        if why:
            raise ParameterError(why)
        if self.weights in archs.PRETRAINED and self.weights != entry.published.kind:
            raise ParameterError(f"weights={self.weights!r}: {self.arch} is published with "
                                 f"{entry.published.what}: use weights="
                                 f"{entry.published.kind!r}, a weights file, or None")
        if self.monitor.startswith(("sbi_", "mean_")) and not self.self_blends:
            raise ParameterError(f"monitor={self.monitor!r} needs fakes=\"sbi\" or "
                                 "\"sbi+data\" (the self-blended validation set exists only "
                                 "then)")
        if not 0.0 <= self.sbi_share <= 1.0:
            raise ParameterError(f"sbi_share must be between 0 and 1, got {self.sbi_share}")
        if self.fakes == "sbi+data" and self.sbi_share in (0.0, 1.0):
            raise ParameterError(f"sbi_share={self.sbi_share:g} with fakes=\"sbi+data\" trains "
                                 "on one family of fakes only: use fakes=\"" + (
                                     "data" if self.sbi_share == 0 else "sbi") + "\"")
        if self.fakes != "sbi+data" and self.sbi_share != self.defaults()["sbi_share"]:
            raise ParameterError(f"sbi_share applies to fakes=\"sbi+data\" only, not "
                                 f"{self.fakes!r}: leave it out, or mix the two families")


@dataclass(frozen=True)
class GradCamParams(Params):
    """03-gradcam: explain the validation images of a run."""

    step: ClassVar[str] = "03-gradcam"

    run_dir: str = param("runs/notebook", "a run of 02-train: reads model.pt and "
                         "val_predictions.csv", path=True, flags=("--run",))
    data_dir: str = param("data", "the split the run was trained on", path=True)
    n_images: int = param(16, "overlays to write and show")
    select: Selection = param("mixed", "which images: the most confident right and wrong of "
                              "each class, a random sample, or a random sample of each source "
                              "folder's fakes in turn (a combined split's data sets side by "
                              "side)")
    target: CamTarget = param("predicted", "the class explained: the predicted one, or always "
                              "fake, or always real")
    alpha: float = param(0.5, "heatmap weight in the overlay")
    seed: int = param(42, "seeds the random selection and the random baseline maps")
    batch_size: int = param(16, "images per Grad-CAM batch")
    n_eval: int = param(128, "validation images scored for deletion and localization, and "
                        "validation reals whose self-blends are scored for localization")
    layer: CamLayer = cam_layer_param()
    n_bootstrap: int = bootstrap_param("the pointing game and the deletion AUC")

    def check(self) -> None:
        if min(self.n_images, self.batch_size, self.n_eval, self.n_bootstrap) < 1:
            raise ParameterError("n_images, batch_size, n_eval and n_bootstrap must be at "
                                 "least 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ParameterError(f"alpha must be between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class EvalParams(Params):
    """04-evaluate: a trained run on a labelled folder, with robustness and calibration."""

    step: ClassVar[str] = "04-evaluate"

    run_dir: str = trained_run_param()
    model_dir: str = model_dir_param()
    onnx: bool = onnx_param()
    eval_dir: str = param("", "a labelled folder: eval_dir/real and eval_dir/fake; or, with "
                          "split, a split made by 01-split", path=True, flags=("--data",))
    name: str = param("", "report name under run_dir/eval/; empty: the folder's name (and the "
                      "split's, and -self-blends)")
    batch_size: int = batch_param()
    num_workers: int = workers_param()
    split: EvalSplit = param("", "empty: eval_dir is a labelled folder; val or test: score "
                             "that split of the split in eval_dir")
    faces: bool = param(True, "when the run was trained on face crops, crop eval_dir's photos "
                        "and clips the same way first")
    n_bootstrap: int = bootstrap_param("the metrics")
    amp: Amp = amp_param()
    by_source: bool = param(False, "also score each source folder on its own (the first "
                            "folder below real/ and fake/, one data set of a combined split): "
                            "its fakes against its reals")
    self_blends: bool = param(False, "with split: score the split's reals against one fixed "
                              'self-blend of each (those fakes="sbi" validates on) instead of '
                              "its fakes")

    def check(self) -> None:
        check_onnx(self)
        if self.self_blends and not self.split:
            raise ParameterError("self_blends needs split=val or split=test: the self-blends "
                                 "are made from a split's reals and their landmarks")
        if not self.eval_dir:
            raise ParameterError("eval_dir is required: a folder with real/ and fake/ inside, "
                                 "or a split (with split=val or test)")
        if self.batch_size < 1 or self.num_workers < 0 or self.n_bootstrap < 1:
            raise ParameterError("batch_size and n_bootstrap must be >= 1 and num_workers >= 0")
        if self.name and not is_plain_name(self.name):
            raise ParameterError(f"name must be a plain name (letters, digits, '.', '_', '-'), "
                                 f"got {self.name!r}: it becomes a folder under run_dir/eval/")


@dataclass(frozen=True)
class BenchmarkParams(Params):
    """05-benchmark: a run on the test splits of prepared data sets (the table)."""

    step: ClassVar[str] = "05-benchmark"

    run_dir: str = trained_run_param()
    model_dir: str = model_dir_param()
    onnx: bool = onnx_param()
    test_sets: list[str] = param([], "split folders made by 01-split whose test split is "
                                 "scored, comma-separated (TEST_SETS=data/celebdf,data/dfdc)",
                                 path=True)
    batch_size: int = batch_param()
    num_workers: int = workers_param()
    n_bootstrap: int = bootstrap_param("the table's metrics")
    amp: Amp = amp_param()
    n_explain: int = param(100, "test fakes with a mask explained with Grad-CAM per test set "
                           "and method (drawn at random with the seed), or self-blends of "
                           "its test reals where a test set has no masks; 0: no explanation "
                           "rows")
    layer: CamLayer = cam_layer_param()
    all_layers: bool = param(False, "explain at each of the architecture's Grad-CAM layers, "
                             "not only at `layer`")
    seed: int = param(42, "seeds the crops explained and the random baseline maps")

    def check(self) -> None:
        check_onnx(self)
        if self.n_explain < 0:
            raise ParameterError(f"n_explain must be >= 0 (0: no explanation rows), got "
                                 f"{self.n_explain}")
        if not self.test_sets:
            raise ParameterError("test_sets is required: one or more split folders with a "
                                 "test split (TEST_SETS=data/celebdf,data/dfdc)")
        if self.batch_size < 1 or self.num_workers < 0 or self.n_bootstrap < 1:
            raise ParameterError("batch_size and n_bootstrap must be >= 1 and num_workers >= 0")


@dataclass(frozen=True)
class PredictParams(Params):
    """predict: score files and folders with a trained run."""

    step: ClassVar[str] = "predict"

    run_dir: str = command_run_param()
    model_dir: str = model_dir_param()
    onnx: bool = onnx_param()
    paths: list[str] = param([], "image files, clips and folders to score", path=True)
    out: str = param("", "CSV file to write; empty: standard output", path=True)
    cam_dir: str = param("", "also write Grad-CAM overlays to this folder", path=True)
    frames_out: str = param("", "with face cropping: also write one row per frame scored "
                            "(path, frame, p_fake, box) to this CSV", path=True)
    faces: bool = param(True, "when the run was trained on face crops, crop the inputs the "
                        "same way first")
    layer: CamLayer = cam_layer_param()
    batch_size: int = batch_param()
    num_workers: int = workers_param()
    amp: Amp = amp_param()

    def check(self) -> None:
        if not (self.run_dir or self.model_dir) or not self.paths:
            raise ParameterError("predict needs a run (--run) or an exported detector "
                                 "(--model), and at least one path")
        if self.run_dir and self.model_dir:
            raise ParameterError("predict scores with one model: give --run or --model, not "
                                 "both")
        check_onnx(self)
        if self.onnx and self.cam_dir:
            raise ParameterError("--cam-dir needs gradients, which ONNX Runtime has not: drop "
                                 "--onnx to write Grad-CAM overlays")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ParameterError("batch_size must be >= 1 and num_workers >= 0")


@dataclass(frozen=True)
class ExportParams(Params):
    """export: a trained run as a folder to share (safetensors, config, model card, ONNX)."""

    step: ClassVar[str] = "export"

    run_dir: str = command_run_param()
    out: str = param("", "the folder to write: new or empty", path=True)
    onnx: bool = param(False, "also write model.onnx (dynamic batch), checked against PyTorch "
                       "on the run's validation images")
    n_check: int = param(64, "validation images model.onnx is checked on")
    batch_size: int = batch_param()

    def check(self) -> None:
        if not self.run_dir or not self.out:
            raise ParameterError("export needs a run (--run) and a folder to write (--out)")
        if self.n_check < 1 or self.batch_size < 1:
            raise ParameterError("n_check and batch_size must be at least 1")


@dataclass(frozen=True)
class AppParams(Params):
    """app: a web page to try a detector on an image or a clip."""

    step: ClassVar[str] = "app"

    run_dir: str = command_run_param()
    model_dir: str = model_dir_param()
    port: int = param(7860, "the port on 127.0.0.1 the page is served at")
    save_dir: str = param("", "where the page may save a dropped file and its answer when "
                          "asked (a box to tick); empty: nothing is ever kept", path=True)
    max_file_mb: int = param(200, "the largest file the page accepts, in MB")
    batch_size: int = batch_param()

    def check(self) -> None:
        if bool(self.run_dir) == bool(self.model_dir):
            raise ParameterError("the page shows one detector: give a run (--run) or an "
                                 "exported folder (--model)")
        if not 0 < self.port < 65536 or self.max_file_mb < 1 or self.batch_size < 1:
            raise ParameterError("port must be 1-65535, max_file_mb and batch_size >= 1")


@dataclass(frozen=True)
class DemoParams(Params):
    """demo: build the demo data set."""

    step: ClassVar[str] = "demo"

    out: str = param("data/demo_raw", "output folder", path=True)
    n_per_class: int = param(400, "images per class", flags=("--n",))
    size: int = param(96, "side in pixels")
    seed: int = param(0, "seeds the crops and the blends")

    def check(self) -> None:
        if self.n_per_class < 1 or self.size < 16:
            raise ParameterError("n_per_class must be >= 1 and size >= 16")


def read_params_file(params_file: str | os.PathLike) -> dict[str, Any]:
    """A YAML parameter file as a mapping; anything else is a ParameterError naming the file."""
    path = resolve(params_file)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParameterError(f"parameter file {path} not found (see notebooks/params/)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParameterError(f"cannot read parameter file {path}: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ParameterError(f"parameter file {path} is not valid YAML{line}: "
                             f"{getattr(error, 'problem', None) or error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ParameterError(f"parameter file {path} must be a mapping of `name: value` lines, "
                             f"not a {type(values).__name__}")
    return values


def from_working_dir(values: Mapping[str, str], classes: Sequence[type[Params]],
                     cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """Command-line values with the relative paths among them (the parameters `classes`
    mark as paths) made absolute against the user's working directory, as every
    command-line tool reads them."""
    base = Path(cwd or os.getcwd())
    fields = {f.name: typing.get_type_hints(cls)[f.name] for cls in classes
              for f in dataclasses.fields(cls) if f.metadata.get("path")}

    def here(text: str) -> str:
        return str(base / Path(text).expanduser())

    return {k: (json.dumps([here(p) for p in _coerce(k, v, list[str])])
                if typing.get_origin(fields[k]) is list else here(v))
            if k in fields and isinstance(v, str) and v.strip().lower() not in WEIGHT_NAMES
            else v for k, v in values.items()}
