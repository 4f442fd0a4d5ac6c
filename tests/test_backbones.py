"""The field's current backbones through timm: the published weight files load through the
local-file path (never downloaded), a wrong or missing file is one line, and the
parameter-efficient `trainable` modes train exactly the parameters they name."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from dfutils import archs
from dfutils import model as M
from dfutils.params import ParameterError, TrainParams

# OpenAI's CLIP names for timm's ViT parameters (timm converts them back when it loads).
OPENAI_NAMES = [("patch_embed.proj", "conv1"), ("pos_embed", "positional_embedding"),
                ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
                ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
                ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj")]


def openai_clip_state(name: str = "vit_base_patch16_clip_quickgelu_224"
                      ) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A random CLIP image tower as OpenAI's CLIP file holds it ('visual.' names, the
    projection as `proj`), with a piece of the text tower beside it, and the timm network
    it came from."""
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=512)
    state = {"token_embedding.weight": torch.zeros(8, 4)}  # the text tower: not read
    for key, value in source.state_dict().items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            value = value[0]
        elif key == "head.weight":
            key, value = "proj", value.t().contiguous()
        elif key == "head.bias":
            continue
        elif key == "norm.weight" or key == "norm.bias":
            key = key.replace("norm", "ln_post")
        for timm_name, openai_name in OPENAI_NAMES:
            key = key.replace(timm_name, openai_name)
        state[f"visual.{key}"] = value.clone()
    return state, source


class Holder(nn.Module):
    """A TorchScript module that only holds tensors, as OpenAI's CLIP archive holds them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.mark.parametrize("form", ["open_clip", "openai"])
def test_a_clip_file_as_published_loads_through_the_local_file_path(tmp_path, form):
    """OpenAI's file is a TorchScript archive; open_clip's a state dict of the same names.
    Either loads into the tower at another input size (the position embeddings resized),
    with a new one-logit head."""
    state, source = openai_clip_state()
    path = tmp_path / ("ViT-B-16.pt" if form == "openai" else "open_clip_pytorch_model.bin")
    if form == "openai":
        torchscript_archive(state, path)
    else:
        torch.save(state, path)
    net = M.build_model("clip_vit_b16", path, "head", 96)
    assert torch.equal(net.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(net.blocks[11].attn.qkv.weight, source.blocks[11].attn.qkv.weight)
    assert torch.equal(net.cls_token, source.cls_token)
    assert net.pos_embed.shape == (1, 1 + 6 * 6, 768)  # 14 x 14 patches resized to 6 x 6
    assert net.head.weight.shape == (1, 768)


def test_the_published_file_is_looked_for_where_torch_keeps_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = archs.get("clip_vit_b16")
    with pytest.raises(M.WeightsUnavailable) as missing:
        M.build_model("clip_vit_b16", "clip", "head", 64)
    message = str(missing.value)
    assert "\n" not in message and entry.published.url in message
    assert str(tmp_path / "hub" / "checkpoints" / "ViT-B-16.pt") in message
    assert "weights=None" in message
    state, source = openai_clip_state()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "ViT-B-16.pt")
    net = M.build_model("clip_vit_b16", "clip", "norm", 64)
    assert torch.equal(net.blocks[0].norm1.weight, source.blocks[0].norm1.weight)


def test_weights_of_another_kind_are_refused_in_one_line():
    with pytest.raises(ParameterError, match=r"weights='imagenet': clip_vit_b16 is published "
                                             r"with OpenAI's CLIP ViT-B/16.*weights='clip'"):
        TrainParams(arch="clip_vit_b16")  # weights' default is "imagenet"
    with pytest.raises(M.WeightsUnavailable, match="use weights='imagenet'"):
        M.build_model("resnet18", "clip", "head")
    with pytest.raises(ParameterError, match="not a multiple of clip_vit_l14's patch side "
                                             r"\(14\): use 224 or 238"):
        TrainParams(arch="clip_vit_l14", weights="clip", image_size=230)


@pytest.mark.parametrize("arch,timm_name,suffix", [
    ("xception", "legacy_xception", ".pth"),
    ("tf_efficientnet_b4", "tf_efficientnet_b4", ".safetensors")])
def test_a_timm_checkpoint_loads_its_backbone_with_a_new_head(tmp_path, arch, timm_name,
                                                             suffix):
    torch.manual_seed(0)
    source = timm.create_model(timm_name, pretrained=False)  # ImageNet's 1000 classes
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    net = M.build_model(arch, path, "last", 64)
    first = next(iter(source.state_dict()))
    assert torch.equal(net.state_dict()[first], source.state_dict()[first])
    assert archs.get(arch).head_module(net).out_features == 1


@pytest.mark.parametrize("content,message", [
    (lambda path: torch.save(timm.create_model("resnet18").state_dict(), path), "do not fit"),
    (lambda path: path.write_bytes(b"garbage" * 10), "cannot read weights file"),
    (lambda path: torch.save({}, path), "holds no state dict"),
    (lambda path: None, "not found")])
def test_a_wrong_or_missing_weights_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    content(path)
    with pytest.raises(M.WeightsUnavailable, match=message) as error:
        M.build_model("xception", path, "head", 64)
    assert "\n" not in str(error.value) and "weights.pth" in str(error.value)


def test_the_trainable_counts_of_each_mode_are_exact():
    """ViT-B/16 at 224 px, counted from its shape: 12 blocks of width 768, 197 tokens."""
    width, depth, tokens = 768, 12, 197
    block = 12 * width**2 + 13 * width  # qkv, proj, two MLP layers (4x), two LayerNorms
    norm, head = 2 * width, width + 1
    # patches (CLIP's patch convolution has no bias), class token, positions, the
    # LayerNorm before the blocks, the blocks, the final LayerNorm, the head
    total = 3 * 16 * 16 * width + width + tokens * width + norm + depth * block + norm + head
    expected = {"head": head, "norm": (2 * depth + 2) * norm + head,
                "last": block + norm + head, "last:4": 4 * block + norm + head, "all": total}
    for trainable, count in expected.items():
        net = M.build_model("clip_vit_b16", None, trainable, 224)
        assert M.trainable_count(net) == (count, total), trainable
    # a CNN's "norm" is its BatchNorm layers' scales and shifts, with the head
    net = M.build_model("resnet18", None, "norm")
    batch_norms = sum(2 * m.num_features for m in net.modules()
                      if isinstance(m, nn.BatchNorm2d))
    assert M.trainable_count(net)[0] == batch_norms + 513
