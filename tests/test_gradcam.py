import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dfutils import archs, viz
from dfutils.cam import GradCAM, deletion_score, localization, scale_maps, upsample
from dfutils.gradcam import select_images
from dfutils.model import build_model, set_trainable


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("resnet18", None, "all").eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(3, 3, 96, 96)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = x - x.min()
    return x / (1e-7 + x.max())


@pytest.mark.parametrize("target,category", [("fake", 1), ("real", 0)])
def test_maps_match_pytorch_grad_cam(model, batch, target, category):
    from pytorch_grad_cam import GradCAM as Reference
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    with Reference(model=model, target_layers=[model.layer4[-1]]) as reference:
        expected = reference(input_tensor=batch,
                             targets=[BinaryClassifierOutputTarget(category)] * len(batch))
    with GradCAM(model) as cam:
        raw, _, _ = cam.raw(batch, target)
    # pytorch-grad-cam scales (min-max) at the layer's resolution, resizes with OpenCV, and
    # scales the resized map once more; the same steps on our raw maps must give its result.
    ours = np.stack([_minmax(cv2.resize(_minmax(m), (96, 96))) for m in raw.numpy()])
    np.testing.assert_allclose(ours, expected, atol=1e-4)



CNNS = [name for name, entry in archs.ARCHS.items() if not entry.patch]


def _centred(entry, layer: str) -> tuple[int, int]:
    """An input side and a cell whose receptive field is centred on the input (so that its
    clipping by the borders is alike on all sides), the smallest of at least 8 strides."""
    stride = entry.explained(layer).stride
    for side in range(8 * stride, 16 * stride):
        for cell in range(1, 16):
            if abs(stride * cell + entry.offset(layer, side) - (side - 1) / 2) <= 0.5:
                return side, cell
    raise AssertionError("no centred cell")


@pytest.mark.parametrize("arch,layer", [(a, layer) for a in CNNS for layer in archs.CAM_LAYERS])
def test_a_cell_lands_on_the_pixels_it_looks_at(arch, layer):
    """A layer's cell i sees the input around pixel s i + offset (its receptive field's
    centre, measured as the centroid of the input gradient of that one cell: 0 for
    torchvision's CNNs, 3 for Xception's unpadded stem, and for TensorFlow's "SAME" padding
    what the sides' parity makes it); the map puts it there, not half a cell lower and
    further right as plain resizing does."""
    entry = archs.get(arch)
    torch.manual_seed(0)
    net = entry.new().eval()
    stride = entry.explained(layer).stride
    size, cell = _centred(entry, layer)
    offset = entry.offset(layer, size)
    at_pixel = stride * cell + offset
    captured = {}
    handle = entry.cam_layer(net, layer).register_forward_hook(
        lambda module, inputs, output: captured.setdefault("out", output))
    x = torch.randn(1, 3, size, size, requires_grad=True)
    net(x)
    handle.remove()
    grid = captured["out"].shape[-2:]
    assert tuple(grid) == entry.grid((size, size), layer)
    captured["out"][0, :, cell, cell].sum().backward()
    weight = x.grad[0].abs().sum(0)
    at = torch.arange(size, dtype=torch.float32)
    centre = ((weight.sum(1) * at).sum() / weight.sum(), (weight.sum(0) * at).sum() / weight.sum())
    assert all(abs(float(c) - at_pixel) <= max(2, stride / 8) for c in centre), centre
    one_hot = torch.zeros(1, *grid)
    one_hot[0, cell, cell] = 1
    placed = upsample(one_hot, (size, size), stride, (offset, offset))
    peak = np.unravel_index(int(placed.argmax()), (size, size))
    assert all(abs(int(p) - at_pixel) <= 0.5 for p in peak)
    plain = torch.nn.functional.interpolate(one_hot[:, None], size=(size, size), mode="bilinear",
                                            align_corners=False)[0, 0]
    if stride >= 16 and offset == 0:  # a symmetric network: resizing misplaces its cells
        assert float(plain[stride * cell, stride * cell]) < 0.6


def test_a_patch_token_lands_on_the_pixels_of_its_patch():
    """A transformer's token (after the class token) stands for one patch: changing the
    pixels of patch (i, j) changes only cell (i, j) of the grid `to_grid` lays the tokens
    on, and the map puts that cell's peak on the patch's centre."""
    entry = archs.get("clip_vit_b16")
    size, patch, (i, j) = 96, entry.patch, (2, 4)
    torch.manual_seed(0)
    net = entry.new(size).eval()
    outputs = []
    handle = net.get_submodule("blocks.0.norm1").register_forward_hook(
        lambda module, inputs, output: outputs.append(output))
    x = torch.randn(1, 3, size, size)
    changed = x.clone()
    changed[..., patch * i:patch * (i + 1), patch * j:patch * (j + 1)] += 1
    with torch.no_grad():
        net(x), net(changed)
    handle.remove()
    difference = (entry.to_grid(outputs[1], (size, size)) - entry.to_grid(outputs[0], (size, size))
                  ).abs().sum(1)[0]
    assert difference.shape == (size // patch, size // patch)
    assert [tuple(ij) for ij in torch.nonzero(difference > 1e-6).tolist()] == [(i, j)]
    one_hot = torch.zeros(1, size // patch, size // patch)
    one_hot[0, i, j] = 1
    offset = entry.offset("last", size)
    placed = upsample(one_hot, (size, size), patch, (offset, offset))[0]
    at = torch.arange(size, dtype=torch.float32)
    centre = ((placed.sum(1) * at).sum() / placed.sum(), (placed.sum(0) * at).sum() / placed.sum())
    assert [float(c) for c in centre] == pytest.approx([patch * i + 7.5, patch * j + 7.5], abs=0.01)
    peak = np.unravel_index(int(placed.argmax()), (size, size))
    assert patch * i <= peak[0] < patch * (i + 1) and patch * j <= peak[1] < patch * (j + 1)


@pytest.mark.parametrize("target,category", [("fake", 1), ("real", 0)])
def test_transformer_maps_match_pytorch_grad_cams_reshape_recipe(target, category):
    """pytorch-grad-cam explains a ViT at its last block's first LayerNorm, with a
    reshape_transform that drops the class token and lays the tokens on the patch grid."""
    from pytorch_grad_cam import GradCAM as Reference
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    size = 96
    torch.manual_seed(0)
    net = build_model("clip_vit_b16", None, "head", size).eval()  # frozen: the leaf matters
    torch.manual_seed(1)
    images = torch.randn(3, 3, size, size)

    def reshape_transform(tensor, height=size // 16, width=size // 16):
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    for p in net.parameters():  # the reference needs a graph through the network
        p.requires_grad_(True)
    with Reference(model=net, target_layers=[net.blocks[-1].norm1],
                   reshape_transform=reshape_transform) as reference:
        expected = reference(input_tensor=images,
                             targets=[BinaryClassifierOutputTarget(category)] * len(images))
    set_trainable(net, "head")
    with GradCAM(net) as cam:
        raw, _, _ = cam.raw(images, target)
    assert raw.shape == (3, 6, 6) and (raw.flatten(1).amax(1) > 0).all()
    ours = np.stack([_minmax(cv2.resize(_minmax(m), (size, size))) for m in raw.numpy()])
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_fake_and_real_targets_explain_different_evidence(model, batch):
    with GradCAM(model) as cam:
        fake, real = cam(batch, "fake"), cam(batch, "real")
        predicted = cam(batch, "predicted")
    assert not np.allclose(fake.maps, real.maps)
    np.testing.assert_allclose(fake.p_fake, real.p_fake)
    chosen = np.where(predicted.p_fake[:, None, None] >= 0.5, fake.maps, real.maps)
    np.testing.assert_allclose(predicted.maps, chosen, atol=1e-6)
    assert predicted.maps.shape == (3, 96, 96)
    assert predicted.maps.min() >= 0 and predicted.maps.max() <= 1


def test_frozen_backbone_still_gives_non_zero_maps(batch):
    torch.manual_seed(0)
    frozen = build_model("resnet18", None, "head").eval()
    assert not any(p.requires_grad for p in frozen.layer4.parameters())
    with GradCAM(frozen) as cam:
        result = cam(batch, "predicted")
    assert all(m.max() == 1.0 for m in result.maps)


@pytest.mark.parametrize("raise_inside", [False, True])
def test_model_is_left_as_found(raise_inside, batch):
    model = build_model("resnet18", None, "head")
    model.train()
    model.layer1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with GradCAM(model) as cam:
            cam(batch, "fake")
            if raise_inside:
                raise RuntimeError("user code failed")
    except RuntimeError:
        pass
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_no_positive_evidence_gives_zeros_not_nan():
    maps = scale_maps(torch.stack([torch.zeros(4, 4), torch.rand(4, 4)]))
    assert torch.equal(maps[0], torch.zeros(4, 4)) and maps[1].max() == 1
    assert not torch.isnan(maps).any()


def test_hot_top_left_is_red_in_the_saved_png(tmp_path):
    image = np.full((64, 64, 3), 128, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    cam[:16, :16] = 1.0
    viz.save_rgb(tmp_path / "overlay.png", viz.overlay(image, cam, alpha=1.0))
    pixels = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    r, g, b = pixels[4, 4]
    assert r > 100 and b < 50, (r, g, b)  # hot = red
    r, g, b = pixels[60, 60]
    assert b > 100 and r < 50, (r, g, b)  # cold = blue


class PatchModel(nn.Module):
    """A model whose only evidence for fake is the brightness of the top-left patch."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1)])
        with torch.no_grad():
            self.layer4[0].weight.zero_()
            self.layer4[0].weight[:, :, 1, 1] = 1.0
            self.layer4[0].bias.zero_()
        self.fc = nn.Linear(4, 1)
        with torch.no_grad():
            self.fc.weight.fill_(4.0)
            self.fc.bias.fill_(-2.0)

    def forward(self, x):
        features = torch.relu(self.layer4[0](x))[:, :, :8, :8]  # sees the top-left only
        return self.fc(features.mean(dim=(2, 3)))


def test_deletion_puts_cam_ahead_of_random_when_the_evidence_is_known():
    torch.manual_seed(0)
    model = PatchModel().eval()
    images = torch.rand(6, 3, 32, 32) * 0.2
    images[:, :, :8, :8] += 1.0
    with GradCAM(model, model.layer4[0]) as cam:
        result = cam(images, "predicted")
    assert (result.p_fake > 0.5).all()
    score = deletion_score(model, images, result.maps, result.explained, fill="mean",
                           grid=result.grid, clusters=None, n_resamples=1000)
    assert score["auc_cam"] < score["auc_random"]
    assert score["cam"][0] == score["random"][0]  # nothing removed: same start
    low, high = score["ci"]["auc_cam"]
    assert low <= score["auc_cam"] <= high and score["ci"]["difference"][1] < 0


def test_localization_scores_a_map_inside_the_mask_above_random():
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    cam = np.zeros((32, 32), np.float32)
    cam[10:18, 10:18] = 1.0
    result = localization([cam] * 5, [mask] * 5, n_random=20, grid=(4, 4), clusters=None,
                          n_resamples=1000)
    assert result["pointing_cam"] == 1.0 and result["iou_cam"] == pytest.approx(64 / 144)
    assert result["pointing_random"] < 0.6 and result["iou_random"] < result["iou_cam"]
    assert result["ci"]["pointing_cam"] == [1.0, 1.0] and result["ci"]["difference"][0] > 0


def test_grad_cam_of_any_layer_works_after_scoring_under_inference_mode(tmp_path):
    """Scoring converts the weights to channels-last; done under inference_mode, they would
    become inference tensors and every layer explained below layer4 would fail."""
    from dfutils.cam import explain
    from dfutils.model import load_checkpoint, save_checkpoint
    from dfutils.scoring import images_for, score

    path = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
                    ).save(path)
    save_checkpoint(tmp_path / "model.pt", build_model("resnet18", None, "all").eval(),
                    params={"image_size": 64, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    score(checkpoint, images_for(checkpoint, [path]), batch_size=64)
    for layer in ("last-2", "last-1", "layer3", "auto"):
        _, cams = explain(checkpoint, [path], "fake", layer=layer)
        assert cams.maps.shape == (1, 64, 64) and np.isfinite(cams.maps).all()


@pytest.mark.parametrize("mode", ["mixed", "random"])
def test_selection(mode):
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    scores = np.array([0.99, 0.6, 0.2, 0.1, 0.4, 0.9, 0.45, 0.55])
    chosen = select_images(labels, scores, 4, mode, seed=0)
    assert len(set(chosen)) == 4
    if mode == "mixed":  # confident right fake, wrong fake, right real, wrong real
        assert chosen == [0, 2, 3, 5]


def test_the_sources_selection_shows_each_source_folders_fakes_side_by_side():
    """select="sources": a seeded sample of each source folder's fakes, the share split
    evenly and each source's together (a grid row per data set), reals never; the same
    seed the same images, and not simply the most confident ones."""
    rng = np.random.default_rng(3)
    sources = np.array(["swaps"] * 20 + ["gan"] * 30 + ["gan"] * 10)
    labels = np.array([1] * 50 + [0] * 10)
    scores = rng.random(60)
    chosen = select_images(labels, scores, 7, "sources", seed=1, sources=sources)
    assert [sources[i] for i in chosen] == ["gan"] * 4 + ["swaps"] * 3
    assert all(labels[i] == 1 for i in chosen) and len(set(chosen)) == 7
    assert chosen == select_images(labels, scores, 7, "sources", seed=1, sources=sources)
    assert chosen != select_images(labels, scores, 7, "sources", seed=2, sources=sources)
    gan = np.flatnonzero((labels == 1) & (sources == "gan"))
    assert sorted(chosen[:4]) != sorted(gan[np.argsort(-scores[gan])][:4].tolist())


@pytest.mark.parametrize("difference,said", [([0.1, 0.3], "better"), ([-0.3, -0.1], "worse"),
                                             ([-0.1, 0.2], "not distinguishable")])
def test_the_verdict_on_random_maps_follows_the_paired_difference(difference, said):
    from dfutils.gradcam import check_lines

    located = {"n": 8, "pointing_cam": 0.5, "pointing_random": 0.3,
               "ci": {"pointing_cam": [0.4, 0.6], "pointing_random": [0.2, 0.4],
                      "difference": difference}}
    deletion = {"auc_cam": 0.5, "auc_random": 0.6,
                "ci": {"auc_cam": [0.4, 0.6], "auc_random": [0.5, 0.7],
                       "difference": [-d for d in difference[::-1]]}}  # lower is better
    lines = check_lines({"deletion": deletion, "localization": located,
                         "self_blends": {"localization": {"n": 0}}})
    assert f"; {said} than random maps" in lines[0] or f"; {said} from random" in lines[0]
    assert f"; {said} than random maps" in lines[1] or f"; {said} from random" in lines[1]
    assert lines[2] == ""
