import numpy as np
import pytest
import torch
from conftest import evaluate as evaluate_run
from conftest import make_split, write_image
from PIL import Image

from dfutils import archs, data, images, manifest, paths
from dfutils.model import build_model
from dfutils.params import TrainParams
from dfutils.train import EarlyStopping, evaluate, fit, make_optimizer, train_one_epoch


def test_labels_come_from_the_manifest_fake_is_one(separable_split):
    samples = manifest.read_manifest(separable_split)
    assert {s.label for s in samples if s.path.parent.name == "fake"} == {1}
    assert {s.label for s in samples if s.path.parent.name == "real"} == {0}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    if mode == "I;16":
        path = tmp_path / "deep.png"
        Image.fromarray(np.full((8, 8), 40_000, np.uint16)).save(path)
    else:
        path = write_image(tmp_path / "x.png", seed=0, mode=mode)
    image = images.load_image(path)
    assert image.mode == "RGB"
    if mode == "I;16":  # scaled from 16 bits, not clipped to white
        assert np.asarray(image)[0, 0, 0] == 40_000 // 256


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif)
    assert images.load_image(tmp_path / "r.jpg").size == (10, 30)


def test_a_file_that_breaks_mid_training_is_named(tmp_path):
    path = write_image(tmp_path / "ok.png", seed=0)
    dataset = data.ManifestDataset([manifest.Sample(path, 1, None)],
                                   data.eval_transform(32, "resnet18"))
    path.write_bytes(b"broken")
    with pytest.raises(images.ImageLoadError, match="ok.png"):
        dataset[0]


@pytest.mark.parametrize("jpeg,blur", [(0.0, 0.0), (1.0, 1.0)])
def test_transforms_give_normalised_square_tensors(tmp_path, jpeg, blur):
    image = images.load_image(write_image(tmp_path / "x.png", seed=0, size=50))
    augmented = TrainParams(image_size=40, jpeg_prob=jpeg, blur_prob=blur)
    for transform in (data.eval_transform(40, "resnet18"), data.train_transform(augmented)):
        x = transform(image)
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32
        assert -3 < x.min() < 0 < x.max() < 3


def test_random_erasing_blanks_one_rectangle_of_a_training_image(tmp_path):
    image = images.load_image(write_image(tmp_path / "x.png", seed=0, size=50))
    assert not (data.eval_transform(40, "resnet18")(image) == 0).all(dim=0).any()
    torch.manual_seed(0)
    transform = data.train_transform(TrainParams(image_size=40, jitter=[0, 0, 0, 0], flip=False,
                                                 erasing=1.0))
    for _ in range(5):
        blank = (transform(image) == 0).all(dim=0)  # the mean colour, after normalisation
        rows, cols = blank.any(dim=1).nonzero()[:, 0], blank.any(dim=0).nonzero()[:, 0]
        assert blank[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
        assert 0.015 <= blank.float().mean() <= 0.26


def test_early_stopping_on_a_scripted_loss_sequence():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    decisions = []
    for loss in [1.0, 0.8, 0.795, 0.7, 0.71, 0.72, 0.5]:
        improved = stopper.step(loss)
        decisions.append((improved, stopper.should_stop))
        if stopper.should_stop:
            break
    # 0.795 is not 0.01 better than 0.8; two bad epochs after 0.7 stop the run before 0.5
    assert decisions == [(True, False), (True, False), (False, False), (True, False),
                         (False, False), (False, True)]
    assert stopper.best == 0.7


def _fit(data_dir, tmp_path=None, **overrides):
    params = TrainParams.from_mapping({"data_dir": str(data_dir), "weights": None,
                                       "image_size": 32, "batch_size": 8, "num_workers": 0,
                                       "seed": 0, **overrides})
    torch.manual_seed(params.seed)
    model = build_model(params.arch, None, params.trainable, params.image_size)
    checkpoint = tmp_path / "model.pt" if tmp_path else None
    return model, fit(model, *data.train_val_loaders(params), params, checkpoint=checkpoint,
                      device=torch.device("cpu"))


def test_a_separable_set_is_learned_and_the_best_epoch_is_kept(separable_split, tmp_path):
    model, result = _fit(separable_split, tmp_path, trainable="all", lr=1e-3, max_epochs=6,
                         patience=6)
    assert result.metrics["auc"] == 1.0
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]
    # the model returned holds the best epoch's weights: its loss is the best loss
    _, val_loader = data.train_val_loaders(TrainParams(data_dir=str(separable_split),
                                                       image_size=32, batch_size=8,
                                                       num_workers=0))
    assert evaluate(model, val_loader, torch.device("cpu")).loss == pytest.approx(
        best["val_loss"], rel=1e-5)
    assert set(result.history[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                      "val_auc", "lr", "seconds", "images_per_s"}
    assert (tmp_path / "model.pt").is_file()


def test_frozen_backbone_parameters_and_batchnorm_buffers_do_not_change(separable_split):
    torch.manual_seed(0)
    model = build_model("resnet18", None, "head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, result = _fit_model(model, separable_split)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert result.history


def _fit_model(model, data_dir):
    params = TrainParams.from_mapping({"data_dir": str(data_dir), "weights": None,
                                       "trainable": "head", "image_size": 32, "batch_size": 8,
                                       "num_workers": 0, "max_epochs": 2, "lr": 1e-2})
    return model, fit(model, *data.train_val_loaders(params), params, device=torch.device("cpu"))


def test_the_same_seed_gives_the_same_history_twice(separable_split):
    runs = [_fit(separable_split, trainable="all", max_epochs=2, jitter=[0.3, 0.3, 0.3, 0.1])[1]
            for _ in range(2)]
    strip = [[{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
              for h in r.history] for r in runs]
    assert strip[0] == strip[1]


def interrupt_epoch(monkeypatch, n: int) -> None:
    """Ctrl-C at the start of the n-th epoch that train_one_epoch is asked for."""
    import dfutils.train as T

    real, calls = T.train_one_epoch, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(T, "train_one_epoch", interrupting)


def test_ctrl_c_keeps_the_best_epoch(separable_split, tmp_path, monkeypatch):

    interrupt_epoch(monkeypatch, 2)
    _, result = _fit(separable_split, tmp_path, trainable="head", max_epochs=5)
    assert result.interrupted and result.best_epoch == 1 and len(result.history) == 1
    from dfutils.model import read_checkpoint

    assert read_checkpoint(tmp_path / "model.pt")["epoch"] == 1


@pytest.mark.parametrize("ema,arch", [(0.0, "resnet18"), (0.7, "resnet18"),
                                      (0.0, "clip_vit_b16")])
def test_the_feature_cache_gives_the_head_the_uncached_path_gives(separable_split, ema, arch):
    """A frozen backbone's features, a CNN's or a transformer's (its class token), computed
    once: the head learns what it learns from the images (a linear probe in seconds)."""
    results = {}
    for cache in (False, True):
        model, result = _fit(separable_split, trainable="head", max_epochs=3, patience=3,
                             lr=1e-2, jitter=[0.0] * 4, flip=False, feature_cache=cache,
                             ema=ema, arch=arch)
        head = model.get_submodule(archs.get(arch).head)
        results[cache] = (head.weight.detach().clone(), result.history)
    assert TrainParams(trainable="head", jitter=[0.0] * 4, flip=False).caches_features
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-4)
    for cached, plain in zip(results[True][1], results[False][1], strict=True):
        assert cached["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
        assert cached["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)


@pytest.mark.parametrize("overrides", [{"trainable": "all"}, {"flip": True},
                                       {"jitter": [0.1, 0, 0, 0]}, {"feature_cache": False},
                                       {"mixup": 0.4}, {"crop_scale": 0.8},
                                       {"erasing": 0.5}])
def test_the_feature_cache_is_used_only_when_it_cannot_change_results(overrides):
    base = {"trainable": "head", "jitter": [0.0] * 4, "flip": False}
    assert not TrainParams.from_mapping({**base, **overrides}).caches_features


def test_mixup_blends_images_and_labels_with_the_same_weights():
    from dfutils.train import mix

    torch.manual_seed(0)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    images = labels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()  # each image = its label
    mixed_images, mixed_labels = mix(images, labels, alpha=0.4)
    torch.testing.assert_close(mixed_images.mean(dim=(1, 2, 3)), mixed_labels)
    assert not torch.equal(mixed_labels, labels) and 0 <= mixed_labels.min() <= 1
    assert mixed_labels.sum() == pytest.approx(labels.sum())  # a permutation keeps the mass


class _Bias(torch.nn.Module):
    """A model that ignores its input: one logit for every image."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return self.logit.expand(len(images), 1)


@pytest.mark.parametrize("smoothing,p_fake", [(0.0, None), (0.2, 0.9)])
def test_label_smoothing_caps_the_confidence_training_aims_for(smoothing, p_fake):
    model = _Bias()
    batches = [(torch.zeros(4, 3, 2, 2), torch.ones(4), torch.arange(4))] * 50  # all fake
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(10):
        train_one_epoch(model, batches, optimizer, torch.device("cpu"), None,
                        label_smoothing=smoothing)
    reached = torch.sigmoid(model.logit).item()
    if p_fake is None:
        assert reached > 0.99
    else:  # the smoothed target, 1 - 0.2 / 2, and no further
        assert reached == pytest.approx(p_fake, abs=1e-3)


def test_ema_validates_and_keeps_the_moving_average_of_the_weights(separable_split, tmp_path):
    from dfutils.model import load_checkpoint

    decay = 0.8
    settings = {"trainable": "all", "lr": 1e-3, "max_epochs": 1}
    model, result = _fit(separable_split, tmp_path, ema=decay, **settings)
    # The same epoch by hand, averaging the weights after every step.
    params = TrainParams.from_mapping({"data_dir": str(separable_split), "weights": None,
                                       "image_size": 32, "batch_size": 8, "num_workers": 0,
                                       "seed": 0, **settings})
    torch.manual_seed(params.seed)
    raw = build_model("resnet18", None, "all").to(memory_format=torch.channels_last)
    train_loader, val_loader = data.train_val_loaders(params)
    train_loader.sampler.set_epoch(1)
    average = {}

    def after_step():
        for name, value in raw.state_dict().items():
            if value.is_floating_point():
                previous = average.get(name, value)
                average[name] = decay * previous + (1 - decay) * value

    train_one_epoch(raw, train_loader, make_optimizer(raw, params.lr, 0.0), torch.device("cpu"),
                    "all", after_step=after_step)
    kept = model.state_dict()
    for name, value in average.items():  # BatchNorm statistics included
        torch.testing.assert_close(kept[name], value, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(kept["fc.weight"], raw.fc.weight)  # not the last step's weights
    # what was validated is what fit returns and what the checkpoint holds
    assert evaluate(model, val_loader, torch.device("cpu")).loss == pytest.approx(
        result.metrics["val_loss"], rel=1e-5)
    saved = load_checkpoint(tmp_path / "model.pt").model.state_dict()
    assert all(torch.equal(saved[name], kept[name].cpu()) for name in kept)


@pytest.mark.parametrize("num_workers,amp", [(0, "off"), (2, "off"), (0, "fp16")])
def test_a_resumed_run_has_the_history_of_an_uninterrupted_one(separable_split, tmp_path,
                                                               monkeypatch, num_workers, amp):
    """fp16 (on the CPU too) trains with loss scaling: the scale travels in last.pt."""
    import dfutils.train as T

    settings = {"data_dir": str(separable_split), "weights": None, "trainable": "all",
                "image_size": 32, "batch_size": 8, "max_epochs": 4, "patience": 4,
                "lr": 3e-3, "num_workers": num_workers, "seed": 3, "schedule": "cosine",
                "ema": 0.5, "mixup": 0.2, "jitter": [0.3, 0.3, 0.3, 0.05], "erasing": 0.3,
                "amp": amp}

    def run(name: str, **extra):
        params = TrainParams.from_mapping({**settings, "run_dir": str(tmp_path / name), **extra})
        return T.train_run(params)[0]

    whole = run("whole")
    interrupt_epoch(monkeypatch, 3)
    cut = run("cut")
    assert cut.interrupted and len(cut.history) == 2 and (tmp_path / "cut" / paths.LAST).is_file()
    scaler = torch.load(tmp_path / "cut" / paths.LAST, weights_only=False)["training"][
        "learner"]["scaler"]
    assert bool(scaler) == (amp == "fp16")  # a disabled scaler has no state
    monkeypatch.undo()
    resumed = run("cut", resume=True)

    def strip(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
                for row in history]
    assert strip(resumed.history) == strip(whole.history) and len(whole.history) == 4
    assert resumed.metrics == whole.metrics
    weights = [torch.load(tmp_path / n / "model.pt", weights_only=True)["model_state"]
               for n in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not (tmp_path / "cut" / paths.LAST).exists()  # finished: nothing left to resume


def test_resume_refuses_other_parameters_and_a_run_without_state(separable_split, tmp_path):
    from dfutils.model import CheckpointError
    from dfutils.paths import LAST
    from dfutils.train import train_run

    base = {"data_dir": str(separable_split), "weights": None, "trainable": "all",
            "image_size": 32, "batch_size": 8, "max_epochs": 1, "num_workers": 0,
            "run_dir": str(tmp_path / "r")}
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_run(TrainParams.from_mapping({**base, "resume": True}))
    import dfutils.train as T

    real = T.train_loop

    def stop_after_saving(*args, **kwargs):  # a run killed after its first epoch
        result = real(*args, **kwargs)
        result.interrupted = True
        return result
    T.train_loop = stop_after_saving
    try:
        train_run(TrainParams.from_mapping(base))
    finally:
        T.train_loop = real
    assert (tmp_path / "r" / LAST).is_file()
    with pytest.raises(ValueError, match="other values of lr"):
        train_run(TrainParams.from_mapping({**base, "resume": True, "lr": 0.5}))


def test_a_changed_split_and_a_damaged_last_pt_are_refused_by_name(separable_split, tmp_path,
                                                                   monkeypatch):
    """Issue 26, items 6 and 12: resuming after a re-split trained on validation images
    without a word, and a tampered last.pt gave a bare KeyError."""
    import dfutils.train as T
    from dfutils.gradcam import gradcam_run
    from dfutils.model import CheckpointError
    from dfutils.params import GradCamParams
    from dfutils.paths import LAST

    base = {"data_dir": str(separable_split), "weights": None, "trainable": "all",
            "image_size": 32, "batch_size": 8, "max_epochs": 2, "num_workers": 0,
            "run_dir": str(tmp_path / "r")}
    real = T.train_loop

    def stop_after_saving(*args, **kwargs):  # a run killed after its first epoch
        result = real(*args, **kwargs)
        result.interrupted = True
        return result
    monkeypatch.setattr(T, "train_loop", stop_after_saving)
    T.train_run(TrainParams.from_mapping(base))
    monkeypatch.undo()
    last = tmp_path / "r" / LAST
    kept = last.read_bytes()
    state = torch.load(last, weights_only=True)
    state["training"]["learner"] = {"optimizer": {"state": 1}}
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=f"cannot resume from {last}: its training state "
                                              "is damaged"):
        T.train_run(TrainParams.from_mapping({**base, "resume": True}))
    last.write_bytes(kept)

    make_split(separable_split.parent / "raw", separable_split, seed=0, val_fraction=0.4,
               overwrite=True)
    changed = f"the split in {separable_split} is not the one .* was trained on"
    with pytest.raises(ValueError, match=f"cannot resume: {changed}"):
        T.train_run(TrainParams.from_mapping({**base, "resume": True}))
    with pytest.raises(ValueError, match=f"cannot evaluate on its val split: {changed}"):
        evaluate_run(tmp_path / "r", separable_split, "val", split="val")
    with pytest.raises(ValueError, match=f"cannot explain its validation images: {changed}"):
        gradcam_run(GradCamParams(run_dir=str(tmp_path / "r"), data_dir=str(separable_split)))


def test_a_progress_bar_starts_no_pass_of_its_loader():
    """Making a bar must not call iter() on the loader (tqdm.auto's asyncio mixin does: an
    extra pass of a DataLoader, which broke the exact resume with workers)."""
    from dfutils.progress import tqdm

    class Passes:
        started = 0

        def __iter__(self):
            Passes.started += 1
            return iter(range(3))

        def __len__(self):
            return 3

    bar = tqdm(Passes(), disable=True)
    assert Passes.started == 0
    assert list(bar) == [0, 1, 2] and Passes.started == 1


def test_mixed_precision_on_the_cpu_learns_what_float32_learns(separable_split, tmp_path):
    """bf16 on the CPU: the same validation AUC and loss within 0.05 (a frozen random
    backbone, flips: every batch goes through the network); "auto" on the CPU is float32,
    to the last digit."""
    from dfutils.train import train_run

    def history(amp: str):
        params = TrainParams.from_mapping({
            "data_dir": str(separable_split), "weights": None, "trainable": "head",
            "flip": True, "image_size": 32, "batch_size": 8, "max_epochs": 3, "patience": 3,
            "lr": 1e-2, "num_workers": 0, "seed": 5, "amp": amp, "run_dir": str(tmp_path / amp)})
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
                for row in train_run(params)[0].history]

    off, auto, bf16 = history("off"), history("auto"), history("bf16")
    assert auto == off
    assert bf16 != off  # it did run in bfloat16
    for a, b in zip(bf16, off, strict=True):
        assert abs(a["val_auc"] - b["val_auc"]) <= 0.05
        assert abs(a["val_loss"] - b["val_loss"]) <= 0.05
    assert off[-1]["val_auc"] >= 0.9


def test_compile_compiles_the_stepped_network_and_checkpoints_the_plain_one(
        separable_split, tmp_path, monkeypatch):
    """compile=True hands the network that steps to torch.compile (here a stand-in that
    records it: inductor takes minutes on a CPU); model.pt holds the plain weights."""
    from dfutils.model import load_checkpoint
    from dfutils.train import train_run

    compiled = []

    def record(module):
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, "compile", record)
    params = TrainParams.from_mapping({
        "data_dir": str(separable_split), "weights": None, "trainable": "all",
        "image_size": 32, "batch_size": 8, "max_epochs": 1, "num_workers": 0,
        "compile": True, "run_dir": str(tmp_path / "r")})
    train_run(params)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    state = load_checkpoint(tmp_path / "r" / "model.pt").model.state_dict()
    assert not any(k.startswith("_orig_mod") for k in state)


def test_a_split_without_a_class_in_train_or_val_is_refused_and_said(tmp_path):
    """Issue 36, item 5: fakes="data" trained to "done" on a split with no fake image in val
    (val_auc NaN, nothing said); the split now says which class a split lacks."""
    import csv

    from conftest import make_raw, make_split

    from dfutils import pipeline, split
    from dfutils.train import train_run

    raw = make_raw(tmp_path / "raw", 6, 6)
    data = tmp_path / "data"
    make_split(raw, data)
    with open(data / paths.MANIFEST, newline="") as f:  # the val fakes go to train
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["split"] == "val" and row["label"] == "fake":
            row["split"] = "train"
    with open(data / paths.MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    params = TrainParams(data_dir=str(data), run_dir=str(tmp_path / "r"), weights=None,
                         image_size=32, num_workers=0, max_epochs=1)
    with pytest.raises(ValueError, match="the val split of .* has no fake image"):
        train_run(params)
    assert not (tmp_path / "r").exists()
    with pytest.raises(pipeline.ChainError, match="the val split of .* has no fake image"):
        pipeline.run_all("r", "notebooks/params/smoke.yaml", {"data_dir": str(data)},
                         steps=["02-train"], runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs" / "r").exists()
    report = {"counts": {"val": {"real": 1, "fake": 0}}, "empty": ["val/fake"]}
    assert split.empty_lines(report) == ["val holds no fake image: a model cannot learn or "
                                         "be validated on that class there"]
