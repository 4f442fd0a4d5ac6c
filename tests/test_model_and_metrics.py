import json
import pickle
import urllib.error

import numpy as np
import pytest
import torch

from dfutils import model as M
from dfutils.metrics import binary_metrics, choose_threshold, eer, expected_calibration_error
from dfutils.params import TrainParams


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b4", "xception",
                                  "tf_efficientnet_b4", "clip_vit_b16"])
def test_every_architecture_trains_only_its_parts(arch):
    """Each `trainable` value, by module path: the rest is frozen and in eval(); every
    parameter outside a trained module (a transformer's class token) is frozen too."""
    from dfutils import archs

    entry = archs.get(arch)
    for trainable in ("head", "norm", "last", "last:2", "all"):
        net = M.build_model(arch, None, trainable, 64 if entry.patch != 14 else 56)
        assert entry.head_module(net).out_features == 1
        modules = entry.trained(net, trainable)
        for name, p in net.named_parameters():
            assert p.requires_grad == (modules is None or name.startswith(
                tuple(f"{path}." for path in modules))), (trainable, name)
        M.train_mode(net, trainable)
        frozen = entry.frozen(net, trainable)
        assert all(not m.training for f in frozen for m in f.modules())
        assert all(net.get_submodule(path).training for path in modules or ())


@pytest.mark.parametrize("trainable,trained", [("head", {"fc"}), ("last", {"layer4", "fc"}),
                                               ("all", None)])
def test_trainable_depth_freezes_the_rest(trainable, trained):
    net = M.build_model("resnet18", None, trainable)
    assert net.fc.out_features == 1
    for name, p in net.named_parameters():
        top = name.split(".")[0]
        assert p.requires_grad == (trained is None or top in trained), name
    M.train_mode(net, trainable)
    for name, child in net.named_children():
        assert child.training == (trained is None or name in trained), name


def test_imagenet_weights_offline_error_names_file_folder_and_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(M.WeightsUnavailable) as info:
        M.build_model("resnet18", "imagenet", "head")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "weights=None" in message


def test_local_imagenet_style_state_dict_loads_backbone_and_new_head(tmp_path):
    from torchvision.models import resnet18

    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    net = M.build_model("resnet18", tmp_path / "backbone.pth", "head")
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert net.fc.weight.shape == (1, 512)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b4"])
def test_missing_weights_file_is_a_clear_error(tmp_path, arch):
    with pytest.raises(M.WeightsUnavailable, match="not found.*weights=None"):
        M.build_model(arch, tmp_path / "nope.pth", "head")


def _save(tmp_path, net):
    path = tmp_path / "model.pt"
    M.save_checkpoint(path, net, params={"trainable": "all", "image_size": 32}, threshold=0.4,
                      threshold_rule="eer", metrics={"auc": 0.9}, epoch=3)
    return path


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    net = M.build_model("resnet18", None, "all").eval()
    path = _save(tmp_path, net)
    checkpoint = M.load_checkpoint(path)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), checkpoint.model(x))
    assert (checkpoint.threshold, checkpoint.threshold_rule, checkpoint.epoch) == (0.4, "eer", 3)
    assert checkpoint.metrics == {"auc": 0.9}
    assert isinstance(checkpoint.params, TrainParams)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content,message", [
    (lambda good: good[: len(good) // 2], "not a readable dfutils checkpoint"),
    (lambda good: b"garbage" * 10, "not a readable dfutils checkpoint"),
    (lambda good: pickle.dumps(Evil()), "not a readable dfutils checkpoint"),
])
def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path, content, message):
    path = _save(tmp_path, M.build_model("resnet18", None, "all"))
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(M.CheckpointError, match=message):
        M.load_checkpoint(path)


def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    torch.save(M.build_model("resnet18", None, "head").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(M.CheckpointError, match="not a dfutils checkpoint"):
        M.load_checkpoint(tmp_path / "plain.pt")


def test_binary_metrics_match_a_hand_computed_case():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.4, 0.6, 0.35, 0.8, 0.9]
    m = binary_metrics(labels, scores, threshold=0.5)
    assert m["confusion"] == [[2, 1], [1, 2]]  # rows true (real, fake), columns predicted
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(7 / 9)  # 7 of the 9 (fake, real) pairs ranked right
    assert m["eer"] == pytest.approx(1 / 3)  # at 0.6: one real above, one fake below
    assert m["eer_threshold"] == pytest.approx(0.6)


def test_eer_is_zero_for_separable_scores_and_its_threshold_separates():
    rate, threshold = eer([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert rate == 0.0 and 0.2 < threshold <= 0.7
    assert choose_threshold("eer", [0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == threshold
    assert choose_threshold("0.5", [0, 1], [0.3, 0.6]) == 0.5


def test_metrics_of_a_single_class_are_nan_not_an_error():
    m = binary_metrics([1, 1], [0.7, 0.2])
    assert np.isnan(m["auc"]) and m["accuracy"] == 0.5


def test_ece_is_zero_when_calibrated_and_matches_a_hand_computation():
    # 10 images at P(fake) = 0.3, three of them fake: perfectly calibrated.
    assert expected_calibration_error([1] * 3 + [0] * 7, [0.3] * 10) == pytest.approx(0.0)
    # bins of width 1/15: {0.1, 0.1} with 1 fake -> |0.5 - 0.1| ; {0.9} with 0 fakes -> 0.9
    value = expected_calibration_error([1, 0, 0], [0.1, 0.1, 0.9])
    assert value == pytest.approx((2 * 0.4 + 1 * 0.9) / 3)


def test_video_level_metrics_score_each_group_by_its_mean():
    from dfutils.metrics import grouped, video_metrics, video_scores

    groups = ["a", "a", "b", "b", "b", "c", "d", "d"]
    labels = [0, 0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.2, 0.1, 0.35, 0.8, 0.6]
    names, label, mean = video_scores(groups, labels, scores)
    assert names.tolist() == ["a", "b", "c", "d"] and label.tolist() == [0, 0, 1, 1]
    assert mean == pytest.approx([0.3, 0.4, 0.35, 0.7])
    video = video_metrics(groups, labels, scores)
    # by hand: fakes score 0.35 and 0.7, reals 0.3 and 0.4; of the 4 (fake, real) pairs the
    # fake is above in 3 (all but 0.35 < 0.4): AUC = 3 / 4. Frame level: 0.35 beats 3 reals,
    # 0.8 and 0.6 beat 4 each: 11 / 15.
    assert video["auc"] == pytest.approx(3 / 4) and video["n"] == 4
    assert binary_metrics(labels, scores)["auc"] == pytest.approx(11 / 15)
    assert grouped(groups) and not grouped(["a", "b"]) and not grouped(None)
    with pytest.raises(ValueError, match="both real and fake"):
        video_scores(["a", "a"], [0, 1], [0.1, 0.2])


def test_the_architecture_comes_from_the_registry_and_an_unknown_one_is_one_line(tmp_path):
    from dfutils import archs
    from dfutils.model import CheckpointError, load_checkpoint, save_checkpoint
    from dfutils.params import ParameterError, TrainParams

    entry = archs.get(TrainParams().arch)
    model = M.build_model(entry.name, None, "last")
    assert isinstance(entry.head_module(model), torch.nn.Linear)
    assert entry.head_module(model).out_features == 1
    assert entry.cam_layer(model, "last-1") is model.layer3[-1]
    assert entry.cam_layer(model, "layer3") is model.layer3[-1]  # the name it had before
    assert entry.grid((96, 96), "last-1") == (6, 6)
    with pytest.raises(ParameterError, match="unknown architecture 'vgg11'.*resnet18"):
        TrainParams(arch="vgg11")
    path = tmp_path / "model.pt"
    # a network carries its architecture into its checkpoint; weights alone take params'
    save_checkpoint(path, model, params={"image_size": 32, "arch": "vgg11"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1)
    assert load_checkpoint(path).arch.name == "resnet18"
    save_checkpoint(path, model.state_dict(), params={"image_size": 32, "arch": "vgg11"},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
    with pytest.raises(CheckpointError, match=r"model.pt: unknown architecture 'vgg11'"):
        load_checkpoint(path)


def test_model_pt_and_last_pt_are_one_format_and_resume_needs_the_training_state(tmp_path):
    from dfutils.model import CheckpointError, read_checkpoint, save_checkpoint

    model = M.build_model("resnet18", None, "all")
    for name, training in (("model.pt", None), ("last.pt", {"history": []})):
        save_checkpoint(tmp_path / name, model, params={"image_size": 32}, threshold=0.5,
                        threshold_rule="0.5", metrics={}, epoch=1, training=training)
        assert read_checkpoint(tmp_path / name)["arch"] == "resnet18"
    assert read_checkpoint(tmp_path / "last.pt", resume=True)["training"] == {"history": []}
    with pytest.raises(CheckpointError, match="holds no training state"):
        read_checkpoint(tmp_path / "model.pt", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume: .*gone.pt not found"):
        read_checkpoint(tmp_path / "gone.pt", resume=True)


def _ranked_scores(n: int, separation: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, rng.normal(0, 1, n) + separation * labels


def test_a_bootstrap_interval_covers_its_estimate_and_widens_as_the_sample_shrinks():
    from dfutils.metrics import binary_intervals

    labels, scores = _ranked_scores(400, 1.0)
    big = binary_intervals(labels, scores, 0.5, None, n_resamples=300)
    small = binary_intervals(labels[::8], scores[::8], 0.5, None, n_resamples=300)  # 50
    point = binary_metrics(labels, scores)
    for key in ("auc", "ap", "eer", "accuracy"):
        assert big[key][0] <= point[key] <= big[key][1], key
        assert small[key][1] - small[key][0] > 1.5 * (big[key][1] - big[key][0]), key


def test_the_bootstrap_resamples_whole_clips_and_repeats_itself():
    from dfutils.metrics import binary_intervals, mean_intervals

    # 20 clips of 10 identical frames: resampling frames would act as if there were 200
    # independent images, and give an interval about sqrt(10) times too narrow
    labels, scores = _ranked_scores(20, 0.8)
    frames_l, frames_s, clips = np.repeat(labels, 10), np.repeat(scores, 10), np.repeat(
        np.arange(20), 10)
    by_clip = binary_intervals(frames_l, frames_s, 0.5, clips, 300)["auc"]
    by_frame = binary_intervals(frames_l, frames_s, 0.5, None, 300)["auc"]
    one_per_clip = binary_intervals(labels, scores, 0.5, None, 300)["auc"]
    assert by_clip[1] - by_clip[0] > 2 * (by_frame[1] - by_frame[0])
    assert by_clip == pytest.approx(one_per_clip, abs=0.05)
    assert binary_intervals(frames_l, frames_s, 0.5, clips, 300) == binary_intervals(
        frames_l, frames_s, 0.5, clips, 300)  # a fixed seed
    hits, baseline = np.r_[np.ones(30), np.zeros(10)], np.full(40, 0.1)
    ci = mean_intervals(hits, baseline, None, n_resamples=300)
    assert ci["mean"][0] <= 0.75 <= ci["mean"][1] and ci["difference"][0] > 0


@pytest.mark.parametrize("size,layer", [(64, "last-2"), (96, "last-1"), (128, "last-1"),
                                        (160, "last-1"), (224, "last"), (380, "last"),
                                        (32, "last-2")])
def test_the_auto_layer_is_the_deepest_with_a_grid_of_at_least_six(size, layer):
    from dfutils import archs

    entry = archs.get("resnet18")
    assert entry.layer_for("auto", (size, size)) == layer
    assert entry.layer_for("last-1", (size, size)) == "last-1"  # an explicit choice stays
    assert entry.layer_for("layer3", (size, size)) == "last-1"  # by the name it had before
    model = entry.new().eval()
    grids = {}
    for name, explained in entry.cam_layers.items():
        model.get_submodule(explained.path).register_forward_hook(
            lambda m, i, o, name=name: grids.__setitem__(name, tuple(o.shape[-2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert all(grids[name] == entry.grid((size, size), name) for name in grids)  # the real grid


@pytest.mark.parametrize("arch,trainable,size", [
    ("resnet18", "all", 64), ("resnet50", "all", 64), ("efficientnet_b4", "all", 64),
    ("xception", "all", 64), ("tf_efficientnet_b4", "all", 64), ("clip_vit_b16", "all", 64),
    ("clip_vit_l14", "last", 56)])  # ViT-L's 0.3 G parameters: its last block trains
def test_every_architecture_trains_explains_and_round_trips(separable_split, tmp_path, arch,
                                                            trainable, size):
    """One smoke epoch from random initialisation at a small size; Grad-CAM of each layer on
    its grid; the checkpoint rebuilds the network that scored the validation set."""
    import csv

    from dfutils import archs, cam
    from dfutils.manifest import read_manifest
    from dfutils.model import load_checkpoint
    from dfutils.train import train_run

    params = TrainParams.from_mapping({
        "data_dir": str(separable_split), "weights": None, "trainable": trainable,
        "arch": arch, "image_size": size, "batch_size": 16, "max_epochs": 1,
        "num_workers": 0, "run_dir": str(tmp_path / arch)})
    train_run(params)
    checkpoint = load_checkpoint(tmp_path / arch / "model.pt")
    assert checkpoint.arch.name == arch and checkpoint.image_size == size
    val = read_manifest(separable_split, "val")
    for layer in archs.CAM_LAYERS:
        _, cams = cam.explain(checkpoint, [s.path for s in val[:4]], "fake", 4, layer)
        assert cams.grid == archs.get(arch).grid((size, size), layer)
        assert cams.maps.shape == (4, size, size) and np.isfinite(cams.maps).all()
    with open(tmp_path / arch / "val_predictions.csv", newline="") as f:
        saved = {row["path"]: float(row["p_fake"]) for row in csv.DictReader(f)}
    assert len(saved) == len(val)
    expected = [saved[s.path.relative_to(separable_split).as_posix()] for s in val[:4]]
    metrics = json.loads((tmp_path / arch / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == sum(
        p.numel() for p in checkpoint.model.parameters() if p.requires_grad)
    np.testing.assert_allclose(cams.p_fake, expected, atol=1e-5)
