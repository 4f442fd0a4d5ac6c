"""The model registry: one entry per architecture, holding everything the rest of the package
needs to know about it. Training, Grad-CAM, the transforms and the parameters read the entry;
none of them names a layer of a particular network.

Two libraries build the networks: torchvision (ResNet, EfficientNet) and timm, the field's
model library (Xception, the TensorFlow-ported EfficientNet-B4 of SBI, the CLIP image
towers). A transformer's blocks output tokens, not a feature map; its entry says how many
lead the patch tokens (the class token, registers) and its patch size, so that Grad-CAM can
lay its tokens on their patch grid (`to_grid`).

Adding an architecture is adding an entry to ARCHS (docs/architecture.md shows how).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
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
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # pixels to [-1, 1]: TensorFlow's weights
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# layer="auto": the deepest layer with at least this many cells a side. 6, not 7: at 96 px
# layer3 is 6 x 6 and points into the demo's blends (docs/demo.md), layer2 (12 x 12) does not.
MIN_CAM_GRID = 6
# trainable="norm": the normalisation layers (timm's BatchNormAct2d is a BatchNorm2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


class UnknownArch(ValueError):
    """An architecture name that is not in the registry."""


@dataclass(frozen=True)
class Explained:
    """A block Grad-CAM can explain: its module path and its total stride."""

    path: str
    stride: int


@dataclass(frozen=True)
class Published:
    """An entry's published pretrained weights: which `weights` value loads them, the file
    as it is published and where. torchvision's come through its cache (downloaded when the
    machine is online); timm entries' only from a file the user downloaded, never at run
    time: `file` in torch.hub's checkpoints folder, or its path as `weights`."""

    kind: str  # "imagenet" or "clip": what the weights were trained on
    file: str
    url: str
    what: str  # the weights in words, for messages
    torchvision: WeightsEnum | None = None


@dataclass(frozen=True)
class Arch:
    """What the package needs of one architecture."""

    name: str  # the registry's name (torchvision's, or the short name of a timm network)
    # (image size, a state dict or None) -> the network with a one-logit linear head,
    # randomly initialised or from the state dict (`new`)
    build: Callable[[int, dict | None], nn.Module]
    published: Published
    head: str  # the classifier's module path: one linear layer with one logit
    # The network's blocks in order, input to output, each a tuple of module paths: the
    # stages of a CNN (the blocks at one stride), the blocks of a transformer.
    # trainable="last:k" trains the last k and what follows them (`after`, the head).
    blocks: tuple[tuple[str, ...], ...]
    # Grad-CAM `layer` value -> the block explained, deepest first, named from the output:
    # "last" is the last block of the last stage, "last-1" that of the stage before it,
    # "last-2" of the one before that (ResNet's layer4, layer3, layer2: strides 32, 16, 8);
    # a transformer's are its last three blocks, on one grid
    cam_layers: dict[str, Explained]
    size: int  # the input side its published weights were made for (docs/training.md)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation
    std: tuple[float, float, float] = IMAGENET_STD
    after: tuple[str, ...] = ()  # modules between the last block and the head
    # A transformer: its patch side (image_size must be a multiple) and the tokens its
    # blocks output before the patch tokens (class token, registers). 0: a CNN.
    patch: int = 0
    prefix_tokens: int = 0
    unpadded: int = 0  # pixels of the input's side that unpadded stem convolutions lose
    same_padding: bool = False  # TensorFlow's "SAME" padding (`offset`)

    def new(self, image_size: int | None = None, state: dict | None = None) -> nn.Module:
        """The network with a one-logit head (the log-odds of fake), for inputs of
        `image_size` (a transformer's position embeddings depend on it), marked with its
        architecture (`of` reads it): randomly initialised, or from `state`, a state dict
        of this network or as its weights were published (its library converts it; the
        head is new unless `state` has a one-logit one). A state that does not fit is a
        ValueError saying what is missing or left over."""
        model = self.build(image_size or self.size, state)
        model.arch_name = self.name
        return model

    def head_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def trained(self, model: nn.Module, trainable: str) -> set[str] | None:
        """The module paths that `trainable` trains (None: all of them)."""
        trainable = OLD_NAMES["trainable"].get(trainable, trainable)
        if trainable == "all":
            return None
        if trainable == "head":
            return {self.head}
        if trainable == "norm":
            return {self.head} | {name for name, m in model.named_modules()
                                  if isinstance(m, NORMS)}
        why = self.check_trainable(trainable)
        if why:
            raise ValueError(why)
        k = last_blocks(trainable)
        return {path for block in self.blocks[-k:] for path in block} | set(self.after) | {
            self.head}

    def check_trainable(self, trainable: str) -> str:
        """Why `trainable` means nothing for this network, or "" when it is one of
        TRAINABLE (k of "last:k" at most its number of blocks)."""
        trainable = OLD_NAMES["trainable"].get(trainable, trainable)
        k = last_blocks(trainable)
        if trainable in ("head", "norm", "all") or (k is not None and
                                                     1 <= k <= len(self.blocks)):
            return ""
        return (f"trainable must be one of {', '.join(TRAINABLE)} (k from 1 to "
                f"{len(self.blocks)}) for {self.name}, got {trainable!r}")

    def frozen(self, model: nn.Module, trainable: str) -> list[nn.Module]:
        """The modules that `trainable` keeps frozen, each as high in the tree as it can be."""
        keep = self.trained(model, trainable)
        if keep is None:
            return []

        def outside(module: nn.Module, prefix: str) -> list[nn.Module]:
            found = []
            for name, child in module.named_children():
                path = prefix + name
                if path in keep:
                    continue
                if any(k.startswith(path + ".") for k in keep):
                    found += outside(child, path + ".")
                else:
                    found.append(child)
            return found

        return outside(model, "")

    def explained(self, layer: str) -> Explained:
        """The block a `layer` value explains (not "auto": `layer_for` resolves that)."""
        layer = OLD_NAMES["layer"].get(layer, layer)
        if layer not in self.cam_layers:
            raise ValueError(f"layer must be one of {', '.join(self.cam_layers)} for "
                             f"{self.name}, got {layer!r}")
        return self.cam_layers[layer]

    def cam_layer(self, model: nn.Module, layer: str) -> nn.Module:
        """The block Grad-CAM explains for a `layer` value."""
        return model.get_submodule(self.explained(layer).path)

    def grid(self, size: tuple[int, int], layer: str) -> tuple[int, int]:
        """The resolution of the explained layer's output for an input size."""
        stride = self.explained(layer).stride
        return tuple(math.ceil((side - self.unpadded) / stride) for side in size)

    def offset(self, layer: str, side: int) -> float:
        """Where the centre of the explained layer's cell 0 lies along an input side of
        `side` pixels: its cell i looks at the input around pixel stride i + offset.

        0 where every convolution pads its kernel alike on both sides (torchvision's CNNs);
        half what unpadded stem convolutions lose (Xception: 3); a patch's centre for a
        transformer's tokens. TensorFlow's "SAME" padding pads a strided convolution's far
        side more when the side it reads has an even number of cells, which moves the cells
        half the new stride further in; with an odd number it pads alike. The tests measure
        each entry's cells where this puts them (the centroid of a cell's input gradient).
        """
        stride = self.explained(layer).stride
        if self.patch:
            return (self.patch - 1) / 2
        if not self.same_padding:
            return self.unpadded / 2
        offset, step = 0, 1
        while step < stride:
            if side % 2 == 0:
                offset += step
            side, step = math.ceil(side / 2), step * 2
        return offset

    def layer_for(self, layer: str, size: tuple[int, int]) -> str:
        """The layer explained for a `layer` value at an input size: itself, or for "auto"
        the deepest whose grid is at least MIN_CAM_GRID on each side (when none is, the
        deepest of the finest grid): a map of 3 x 3 cells has nine places to point at."""
        if layer != "auto":
            return OLD_NAMES["layer"].get(layer, layer)
        names = list(self.cam_layers)
        finest = max(names, key=lambda name: (min(self.grid(size, name)), -names.index(name)))
        return next((name for name in names if min(self.grid(size, name)) >= MIN_CAM_GRID),
                    finest)

    def to_grid(self, activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A block's output as a feature map (N, C, h, w): a CNN's as it is; a transformer's
        tokens (N, T, C) without the tokens before the patch tokens, laid on their patch
        grid for an input of `size` (as pytorch-grad-cam's reshape_transform does)."""
        if not self.patch:
            return activations
        h, w = size[0] // self.patch, size[1] // self.patch
        tokens = activations[:, self.prefix_tokens:]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)

    def check_size(self, image_size: int) -> str:
        """Why this network cannot take inputs of `image_size`, or "" when it can."""
        if self.patch and image_size % self.patch:
            lower = max(self.patch, image_size // self.patch * self.patch)
            return (f"image_size={image_size} is not a multiple of {self.name}'s patch side "
                    f"({self.patch}): use {lower} or {lower + self.patch}")
        return ""


def last_blocks(trainable: str) -> int | None:
    """k of a `trainable` value "last:k" ("last" is "last:1"); None for other values."""
    if trainable == "last":
        return 1
    found = re.fullmatch(r"last:(\d+)", trainable)
    return int(found[1]) if found else None


# The names every entry gives its trainable parts and its Grad-CAM layers (the parameters'
# allowed values; "last:k" for any k up to the entry's number of blocks), and the names of
# earlier versions, which mean the same and stay accepted.
TRAINABLE = ("head", "norm", "last", "last:k", "all")
CAM_LAYERS = ("last", "last-1", "last-2")
PRETRAINED = ("imagenet", "clip")  # `weights` values: what an entry's published weights are
OLD_NAMES = {"trainable": {"fc": "head", "layer4": "last"},
             "layer": {"layer4": "last", "layer3": "last-1", "layer2": "last-2"}}


def _fit(model: nn.Module, state: dict, head: str) -> nn.Module:
    """Load `state` into `model`: everything must fit but the head, which stays new unless
    the state has one of the same shape (a one-logit network's)."""
    prefix = f"{head}."
    if getattr(state.get(f"{prefix}weight"), "shape", None) != (
            model.get_submodule(head).weight.shape):
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(str(error).splitlines()[-1].strip()[:300]) from None
    missing = [k for k in missing if not k.startswith(prefix)]
    if missing or unexpected:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _torchvision(make: Callable[..., nn.Module], head: str
                 ) -> Callable[[int, dict | None], nn.Module]:
    """A torchvision network with its classifier replaced by one linear layer with one logit
    (EfficientNet's dropout before it goes: the head is one linear layer for every network,
    the layer that the feature cache trains alone, with what it would see in the network)."""

    def build(image_size: int, state: dict | None) -> nn.Module:
        model = make(weights=None)
        old = [m for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)]
        parent, _, name = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                nn.Linear(old[-1].in_features, 1))
        return model if state is None else _fit(model, state, head)

    return build


def _timm(name: str, head: str, transformer: bool = False
          ) -> Callable[[int, dict | None], nn.Module]:
    """A timm network with one logit; a transformer built for `image_size` (its position
    embeddings). A state dict of this very network loads as it is; any other goes through
    timm's own loader (`pretrained_cfg_overlay`), which converts the published formats
    (OpenAI's and open_clip's CLIP towers among them), resizes position embeddings and
    leaves the head new. Nothing is ever downloaded: the state is given."""

    def build(image_size: int, state: dict | None) -> nn.Module:
        size = {"img_size": image_size} if transformer else {}
        model = timm.create_model(name, pretrained=False, num_classes=1, **size)
        own = model.state_dict()
        if state is None:
            return model
        if state.keys() == own.keys() and all(
                getattr(v, "shape", None) == own[k].shape for k, v in state.items()):
            return _fit(model, state, head)
        try:
            return timm.create_model(name, pretrained=True, num_classes=1, **size,
                                     pretrained_cfg_overlay={"state_dict": dict(state)})
        except (RuntimeError, KeyError) as error:  # missing keys, other shapes
            raise ValueError(" ".join(str(error).split())[:300]) from None

    return build


def _resnet(make: Callable[..., nn.Module], weights: WeightsEnum, cam: tuple[str, str, str]
            ) -> Arch:
    name = make.__name__
    return Arch(
        name=name, build=_torchvision(make, "fc"), head="fc",
        published=Published("imagenet", weights.url.rsplit("/", 1)[-1], weights.url,
                            f"torchvision's {name} ImageNet weights ({weights.name})",
                            torchvision=weights),
        blocks=(("layer1",), ("layer2",), ("layer3",), ("layer4",)),
        cam_layers={"last": Explained(cam[0], 32), "last-1": Explained(cam[1], 16),
                    "last-2": Explained(cam[2], 8)}, size=224)


def _clip(name: str, title: str, timm_name: str, patch: int, depth: int, file: str, url: str
         ) -> Arch:
    """An OpenAI CLIP image tower as timm builds it (QuickGELU, as CLIP was trained)."""
    last = depth - 1
    return Arch(
        name=name, build=_timm(timm_name, "head", transformer=True), head="head",
        published=Published("clip", file, url, f"OpenAI's CLIP {title} image tower "
                            "(OpenAI's file, or open_clip's or timm's copy of it)"),
        blocks=tuple((f"blocks.{i}",) for i in range(depth)), after=("norm", "fc_norm"),
        # The input of each block's attention: the last block's output feeds the head
        # through its class token alone, so its patch tokens get no gradient; before the
        # attention they do (pytorch-grad-cam's recipe for ViTs).
        cam_layers={label: Explained(f"blocks.{block}.norm1", patch)
                    for label, block in (("last", last), ("last-1", last - 1),
                                         ("last-2", last - 2))},
        size=224, mean=CLIP_MEAN, std=CLIP_STD, patch=patch, prefix_tokens=1)


TIMM_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/"
CLIP_MODELS = "https://openaipublic.azureedge.net/clip/models/"
ARCHS: dict[str, Arch] = {
    "resnet18": _resnet(resnet18, ResNet18_Weights.IMAGENET1K_V1,
                        ("layer4.1", "layer3.1", "layer2.1")),
    "resnet50": _resnet(resnet50, ResNet50_Weights.IMAGENET1K_V2,
                        ("layer4.2", "layer3.5", "layer2.3")),
    "efficientnet_b4": Arch(
        name="efficientnet_b4", build=_torchvision(efficientnet_b4, "classifier"),
        published=Published(
            "imagenet", "efficientnet_b4_rwightman-23ab8bcd.pth",
            EfficientNet_B4_Weights.IMAGENET1K_V1.url,
            "torchvision's efficientnet_b4 ImageNet weights (IMAGENET1K_V1)",
            torchvision=EfficientNet_B4_Weights.IMAGENET1K_V1),
        head="classifier",
        # features.0 is the stem; 1-5 stages of strides 2-16; 6, 7 and the 1x1 conv 8 all
        # run at stride 32: the last stage
        blocks=(*((f"features.{i}",) for i in range(1, 6)),
                ("features.6", "features.7", "features.8")),
        cam_layers={"last": Explained("features.8", 32), "last-1": Explained("features.5", 16),
                    "last-2": Explained("features.3", 8)}, size=380),
    # DeepfakeBench's default backbone: Xception as Cadene's pretrainedmodels ported it
    # (timm's legacy_xception). Its two stem convolutions are unpadded: they lose 6 pixels
    # of the input's side (`unpadded`), and every cell sits 3 pixels further in.
    "xception": Arch(
        name="xception", build=_timm("legacy_xception", "fc"), head="fc",
        published=Published("imagenet", "xception-43020ad28.pth",
                            TIMM_RELEASES + "v0.1-cadene/xception-43020ad28.pth",
                            "Xception's ImageNet weights (Cadene's port, timm's "
                            "legacy_xception.tf_in1k)"),
        blocks=(("block1",), ("block2",), ("block3", *(f"block{i}" for i in range(4, 12))),
                ("block12", "conv3", "bn3", "conv4", "bn4")),
        cam_layers={"last": Explained("act4", 32), "last-1": Explained("block11", 16),
                    "last-2": Explained("block2", 8)},
        size=299, mean=INCEPTION_MEAN, std=INCEPTION_STD, unpadded=6),
    # SBI's network: EfficientNet-B4 ported from TensorFlow with its AdvProp weights, and
    # TensorFlow's "SAME" padding (`Arch.offset`).
    "tf_efficientnet_b4": Arch(
        name="tf_efficientnet_b4", build=_timm("tf_efficientnet_b4", "classifier"),
        head="classifier",
        published=Published("imagenet", "tf_efficientnet_b4_ap-dedb23e6.pth",
                            TIMM_RELEASES + "v0.1-weights/tf_efficientnet_b4_ap-dedb23e6.pth",
                            "EfficientNet-B4's AdvProp ImageNet weights (the TensorFlow "
                            "port, timm's tf_efficientnet_b4.ap_in1k, as SBI trains from)"),
        blocks=(*((f"blocks.{i}",) for i in range(5)), ("blocks.5", "blocks.6", "conv_head",
                                                         "bn2")),
        cam_layers={"last": Explained("bn2", 32), "last-1": Explained("blocks.4", 16),
                    "last-2": Explained("blocks.2", 8)},
        size=380, mean=INCEPTION_MEAN, std=INCEPTION_STD, same_padding=True),
    "clip_vit_b16": _clip(
        "clip_vit_b16", "ViT-B/16", "vit_base_patch16_clip_quickgelu_224", 16, 12, "ViT-B-16.pt",
        CLIP_MODELS + "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/"
        "ViT-B-16.pt"),
    "clip_vit_l14": _clip(
        "clip_vit_l14", "ViT-L/14", "vit_large_patch14_clip_quickgelu_224", 14, 24, "ViT-L-14.pt",
        CLIP_MODELS + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/"
        "ViT-L-14.pt"),
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
