"""Validated parameters: one frozen dataclass per notebook, mirroring its `parameters` cell.

Papermill only warns about a parameter the notebook does not declare; here an unknown or
wrong-typed value is an error that names it (as nanoGPT's configurator does).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dfutils.paths import is_plain_name, resolve


class ParameterError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def _choices(*values: str) -> dict:
    return {"choices": values}


# Metadata of a parameter that names a file or folder: on the command line it is relative to
# the user's working directory; in notebooks and parameter files, to the repository root.
PATH = {"path": True}
# Values of `weights` that are not paths.
WEIGHT_NAMES = ("imagenet", "none", "null", "")


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` (ints widened to float where a float is wanted) or raise ParameterError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _check_type(name, value, inner)
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


@dataclass(frozen=True)
class Params:
    """Base: construction from a mapping or a notebook namespace, with validation."""

    notebook: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ParameterError(
                    f"parameter {f.name!r} must be one of {', '.join(map(repr, choices))}; "
                    f"got {value!r}"
                )
        self.check()

    def check(self) -> None:
        """Range checks of a subclass; raise ParameterError."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Params:
        """Build from a dict (a YAML file, a command line); unknown keys are an error."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {', '.join(map(repr, unknown))} for {cls.notebook}; "
                f"known: {', '.join(cls.names())}"
            )
        return cls(**values)

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> Params:
        """Build from a notebook's globals after its parameters cell (and papermill's).

        Papermill injects `-p`/`-f` values as a cell of assignments headed `# Parameters`;
        any name it assigned that this notebook does not declare is refused.
        """
        injected = injected_parameter_names(namespace.get("In", []))
        values = {name: namespace[name] for name in cls.names() if name in namespace}
        return cls.from_mapping({**values, **{k: namespace.get(k) for k in injected}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce(name: str, value: Any, default: Any) -> Any:
    """A command-line string (or a YAML scalar) as the type of the parameter's default."""
    if isinstance(value, str):
        if value.lower() in ("none", "null"):
            return None
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ParameterError(f"parameter {name!r} takes true or false, got {value!r}")
        try:
            if isinstance(default, int):
                return int(value)
            if isinstance(default, float):
                return float(value)
            if isinstance(default, list):
                return json.loads(value)
        except ValueError:
            raise ParameterError(f"parameter {name!r} takes a {type(default).__name__} like "
                             f"{default!r}, got {value!r}") from None
        return value
    if isinstance(default, str) and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # threshold: 0.5 in YAML means the rule "0.5"
    return value


def injected_parameter_names(history: list[str]) -> set[str]:
    """Names assigned by papermill's injected-parameters cell, from the kernel's input history."""
    names: set[str] = set()
    for source in history:
        if not source.lstrip().startswith("# Parameters"):
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@dataclass(frozen=True)
class SplitParams(Params):
    """01-split: turn dataset_raw/{real,fake} into data/{train,val}/{real,fake}."""

    notebook: ClassVar[str] = "01-split"

    raw_dir: str = field(default="dataset_raw", metadata=PATH)  # the user's images, read only
    data_dir: str = field(default="data", metadata=PATH)  # where the split is written
    val_fraction: float = 0.2  # validation share of each class
    seed: int = 42  # seeds the (content-hash) ranking that assigns splits
    overwrite: bool = False  # allow replacing a split made with other parameters

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ParameterError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass(frozen=True)
class TrainParams(Params):
    """02-train: fit ResNet18 with a one-logit head (log-odds of fake)."""

    notebook: ClassVar[str] = "02-train"

    data_dir: str = field(default="data", metadata=PATH)
    run_dir: str = field(default="runs/notebook", metadata=PATH)
    # "imagenet", a path to a state dict, or None (random)
    weights: str | None = field(default="imagenet", metadata=PATH)
    trainable: str = field(default="fc", metadata=_choices("fc", "layer4", "all"))
    image_size: int = 224
    batch_size: int = 32
    max_epochs: int = 20
    lr: float = 1e-4
    patience: int = 3  # epochs without a better validation loss before stopping
    min_delta: float = 0.0  # how much lower a validation loss must be to count as better
    seed: int = 42
    num_workers: int = 2
    jitter: list[float] = field(default_factory=lambda: [0.2, 0.2, 0.2, 0.0])  # b, c, s, hue
    flip: bool = True  # random horizontal flips (the seed's augmentation)
    crop_scale: float = 1.0  # < 1: random resized crops covering this share of the image or more
    mixup: float = 0.0  # > 0: mixup (Zhang et al. 2018) with Beta(mixup, mixup) weights
    erasing: float = 0.0  # probability of erasing one random rectangle (Zhong et al. 2020)
    label_smoothing: float = 0.0  # training targets 0/1 become eps/2 and 1 - eps/2
    ema: float = 0.0  # > 0: validate and keep an average of the weights, this decay per step
    jpeg_prob: float = 0.0  # probability of a random JPEG re-encoding (quality 30-100)
    blur_prob: float = 0.0  # probability of a random Gaussian blur (sigma 0.1-3)
    threshold: str = field(default="0.5", metadata=_choices("0.5", "eer"))
    schedule: str = field(default="constant", metadata=_choices("constant", "cosine"))
    optimizer: str = field(default="adam", metadata=_choices("adam", "sgd"))
    weight_decay: float = 0.0  # Adam: > 0 switches to AdamW (decoupled); SGD: L2 penalty
    feature_cache: bool = True  # trainable="fc" without augmentation: backbone runs once

    @property
    def augmented(self) -> bool:
        return bool(any(self.jitter) or self.flip or self.jpeg_prob or self.blur_prob
                    or self.crop_scale < 1 or self.mixup > 0 or self.erasing > 0)

    @property
    def caches_features(self) -> bool:
        """Whether fit trains the head on backbone features computed once (same result)."""
        return self.feature_cache and self.trainable == "fc" and not self.augmented

    def check(self) -> None:
        for name in ("image_size", "batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ParameterError(f"image_size must be at least 32 px, got {self.image_size}")
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


@dataclass(frozen=True)
class GradCamParams(Params):
    """03-gradcam: explain the validation images of a run."""

    notebook: ClassVar[str] = "03-gradcam"

    run_dir: str = field(default="runs/notebook", metadata=PATH)
    data_dir: str = field(default="data", metadata=PATH)
    n_images: int = 16
    select: str = field(default="mixed", metadata=_choices("mixed", "random"))
    target: str = field(default="predicted", metadata=_choices("predicted", "fake", "real"))
    alpha: float = 0.5
    seed: int = 42
    batch_size: int = 16
    n_eval: int = 128  # validation images scored for deletion and localization
    layer: str = field(default="layer4", metadata=_choices("layer4", "layer3", "layer2"))

    def check(self) -> None:
        if min(self.n_images, self.batch_size, self.n_eval) < 1:
            raise ParameterError("n_images, batch_size and n_eval must be at least 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ParameterError(f"alpha must be between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class EvalParams(Params):
    """04-evaluate: a trained run on a labelled folder, with robustness and calibration."""

    notebook: ClassVar[str] = "04-evaluate"

    run_dir: str = field(default="runs/notebook", metadata=PATH)
    eval_dir: str = field(default="", metadata=PATH)
    name: str = ""
    batch_size: int = 32
    num_workers: int = 2

    def check(self) -> None:
        if not self.eval_dir:
            raise ParameterError("eval_dir is required: a folder with real/ and fake/ inside")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ParameterError("batch_size must be >= 1 and num_workers >= 0")
        if self.name and not is_plain_name(self.name):
            raise ParameterError(f"name must be a plain name (letters, digits, '.', '_', '-'), "
                                 f"got {self.name!r}: it becomes a folder under run_dir/eval/")


NOTEBOOK_PARAMS = (SplitParams, TrainParams, GradCamParams, EvalParams)


def read_params_file(params_file: str | os.PathLike) -> dict[str, Any]:
    """A YAML parameter file as a mapping; anything else is a ParameterError naming the file."""
    import yaml

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


def path_names() -> set[str]:
    """Every parameter that names a file or folder."""
    return {f.name for cls in NOTEBOOK_PARAMS for f in dataclasses.fields(cls)
            if f.metadata.get("path")}


def from_working_dir(values: Mapping[str, str], cwd: str | os.PathLike | None = None
                     ) -> dict[str, str]:
    """Command-line values with the relative paths among them made absolute against the
    user's working directory, as every command-line tool reads them."""
    base = Path(cwd or os.getcwd())
    paths = path_names()
    return {k: str(base / Path(v).expanduser())
            if k in paths and v.strip().lower() not in WEIGHT_NAMES else v
            for k, v in values.items()}


def load_params(cls: type[Params], params_file: str | None, sets: Mapping[str, str]) -> Params:
    """Parameters from a YAML file and `key=value` strings (which win), validated.

    Keys that belong to the other notebooks (a chain's file holds them all) are passed
    over; a key no notebook knows is an error.
    """
    values: dict[str, Any] = {}
    if params_file:
        values.update(read_params_file(params_file))
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    values.update(sets)
    others = {n for c in NOTEBOOK_PARAMS if c is not cls for n in c.names()}
    values = {k: v for k, v in values.items() if k in defaults or k not in others}
    return cls.from_mapping({k: coerce(k, v, defaults[k]) if k in defaults else v
                             for k, v in values.items()})
