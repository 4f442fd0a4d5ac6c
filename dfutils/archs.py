"""The model registry: one entry per architecture, holding everything the rest of the package
needs to know about it. Training, Grad-CAM, the transforms and the parameters read the entry;
none of them names a layer of a particular network.

Adding an architecture is adding an entry to ARCHS (docs/architecture.md shows how).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import (
    EfficientNet_B4_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    WeightsEnum,
    efficientnet_b4,
    resnet18,
    resnet50,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# layer="auto": the deepest layer with at least this many cells a side. 6, not 7: at 96 px
# layer3 is 6 x 6 and points into the demo's blends (docs/demo.md), layer2 (12 x 12) does not.
MIN_CAM_GRID = 6


class UnknownArch(ValueError):
    """An architecture name that is not in the registry."""


@dataclass(frozen=True)
class Arch:
    """What the package needs of one architecture."""

    name: str  # as torchvision names it
    build: Callable[[], nn.Module]  # randomly initialised, with its original classifier
    # torchvision's ImageNet weights (file name, URL, hash, loader); None: none known, a
    # state-dict file is the only pretrained start
    imagenet: WeightsEnum | None
    head: str  # the classifier's module path: replaced by one linear layer with one logit
    # `trainable` value -> the module paths that train (None: all of them), one of
    # TRAINABLE: "head" is the classifier alone, "last" the network's last stage and the
    # head, whatever the network calls them
    stages: dict[str, tuple[str, ...] | None]
    # Grad-CAM `layer` value -> (module path of the block explained, its total stride),
    # deepest first, named from the output: "last" is the last block of the last stage,
    # "last-1" that of the stage before it, "last-2" of the one before that (ResNet's
    # layer4, layer3, layer2: strides 32, 16 and 8)
    cam_layers: dict[str, tuple[str, int]]
    size: int  # the input side its ImageNet weights were made for (docs/training.md)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation
    std: tuple[float, float, float] = IMAGENET_STD

    def new(self) -> nn.Module:
        """The network, randomly initialised, with a one-logit head (the log-odds of fake),
        marked with its architecture (`of` reads it)."""
        model = self.build()
        old = [m for m in model.get_submodule(self.head).modules() if isinstance(m, nn.Linear)]
        parent, _, name = self.head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                nn.Linear(old[-1].in_features, 1))
        model.arch_name = self.name
        return model

    def head_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def frozen(self, model: nn.Module, trainable: str) -> list[nn.Module]:
        """The modules that `trainable` keeps frozen, each as high in the tree as it can be."""
        trainable = OLD_NAMES["trainable"].get(trainable, trainable)
        if trainable not in self.stages:
            raise ValueError(f"trainable must be one of {', '.join(self.stages)} for "
                             f"{self.name}, got {trainable!r}")
        keep = self.stages[trainable]
        if keep is None:
            return []

        def outside(module: nn.Module, prefix: str) -> list[nn.Module]:
            found = []
            for name, child in module.named_children():
                path = prefix + name
                if any(k.startswith(path + ".") for k in keep):
                    found += outside(child, path + ".")
                elif path not in keep:
                    found.append(child)
            return found

        return outside(model, "")

    def cam_layer(self, model: nn.Module, layer: str) -> nn.Module:
        """The block Grad-CAM explains for a `layer` value."""
        layer = OLD_NAMES["layer"].get(layer, layer)
        if layer not in self.cam_layers:
            raise ValueError(f"layer must be one of {', '.join(self.cam_layers)} for "
                             f"{self.name}, got {layer!r}")
        return model.get_submodule(self.cam_layers[layer][0])

    def grid(self, size: tuple[int, int], layer: str) -> tuple[int, int]:
        """The resolution of the explained layer's output for an input size."""
        stride = self.cam_layers[OLD_NAMES["layer"].get(layer, layer)][1]
        return math.ceil(size[0] / stride), math.ceil(size[1] / stride)

    def layer_for(self, layer: str, size: tuple[int, int]) -> str:
        """The layer explained for a `layer` value at an input size: itself, or for "auto"
        the deepest whose grid is at least MIN_CAM_GRID on each side (the shallowest when
        none is): a map of 3 x 3 cells has nine places to point at."""
        if layer != "auto":
            return OLD_NAMES["layer"].get(layer, layer)
        return next((name for name in self.cam_layers
                     if min(self.grid(size, name)) >= MIN_CAM_GRID), list(self.cam_layers)[-1])


# The names every entry gives its trainable parts and its Grad-CAM layers (the parameters'
# allowed values), and the names of earlier versions, which mean the same and stay accepted.
TRAINABLE = ("head", "last", "all")
CAM_LAYERS = ("last", "last-1", "last-2")
OLD_NAMES = {"trainable": {"fc": "head", "layer4": "last"},
             "layer": {"layer4": "last", "layer3": "last-1", "layer2": "last-2"}}

RESNET_STAGES = {"head": ("fc",), "last": ("layer4", "fc"), "all": None}
# The head is one linear layer for every network (EfficientNet's dropout before it goes):
# the layer that the feature cache trains alone, with what it would see in the network.
ARCHS: dict[str, Arch] = {
    "resnet18": Arch(
        name="resnet18", build=lambda: resnet18(weights=None),
        imagenet=ResNet18_Weights.IMAGENET1K_V1, head="fc", stages=RESNET_STAGES,
        cam_layers={"last": ("layer4.1", 32), "last-1": ("layer3.1", 16),
                    "last-2": ("layer2.1", 8)}, size=224),
    "resnet50": Arch(
        name="resnet50", build=lambda: resnet50(weights=None),
        imagenet=ResNet50_Weights.IMAGENET1K_V2, head="fc", stages=RESNET_STAGES,
        cam_layers={"last": ("layer4.2", 32), "last-1": ("layer3.5", 16),
                    "last-2": ("layer2.3", 8)}, size=224),
    "efficientnet_b4": Arch(
        name="efficientnet_b4", build=lambda: efficientnet_b4(weights=None),
        imagenet=EfficientNet_B4_Weights.IMAGENET1K_V1, head="classifier",
        stages={"head": ("classifier",),
                "last": ("features.6", "features.7", "features.8", "classifier"),
                "all": None},
        cam_layers={"last": ("features.8", 32), "last-1": ("features.5", 16),
                    "last-2": ("features.3", 8)}, size=380),
}
DEFAULT = "resnet18"
# Names checkpoints of earlier versions recorded.
ALIASES = {"resnet18-1logit": "resnet18"}


def of(model: nn.Module) -> Arch:
    """The registry entry of a network made by `Arch.new` (also inside the wrappers of
    DistributedDataParallel and torch.compile): a network carries its architecture, so no
    caller can name the wrong one."""
    while not hasattr(model, "arch_name") and isinstance(
            getattr(model, "module", getattr(model, "_orig_mod", None)), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    if not hasattr(model, "arch_name"):
        raise UnknownArch(f"{type(model).__name__} was not made by dfutils.archs: build it "
                          "with dfutils.model.build_model")
    return get(model.arch_name)


def get(name: str) -> Arch:
    """The registry entry of `name`; UnknownArch (one line, with the known names) if none."""
    entry = ARCHS.get(ALIASES.get(name, name))
    if entry is None:
        raise UnknownArch(f"unknown architecture {name!r}: this dfutils knows "
                          f"{', '.join(ARCHS)}")
    return entry
