"""Self-Blended Images: the blend itself, the landmarks behind it, the training pairs, the fixed
validation blends, and training and Grad-CAM with fakes="sbi". Faces are crops of
scikit-image's astronaut photo, tinted and moved (nothing from ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from conftest import make_split
from PIL import Image

from dfutils import blend, sbi
from dfutils.data import eval_transform
from dfutils.images import load_image
from dfutils.manifest import read_manifest
from dfutils.params import ParameterError, TrainParams
from dfutils.paths import LANDMARKS

PHOTO = skimage.data.astronaut()


def ellipse_landmarks(centre=(128.0, 120.0), radii=(45.0, 60.0)) -> np.ndarray:
    """68 points: 40 on an ellipse (the jaw and brows), 28 inside it (eyes, nose, mouth)."""
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    rim = np.stack([centre[0] + radii[0] * np.cos(angles),
                    centre[1] + radii[1] * np.sin(angles)], axis=1)
    inner = np.stack([centre[0] + 0.5 * radii[0] * np.cos(angles[:28] * 3),
                      centre[1] + 0.5 * radii[1] * np.sin(angles[:28] * 2)], axis=1)
    return np.concatenate([rim, inner])


IMAGE = cv2.resize(PHOTO, (256, 256), interpolation=cv2.INTER_AREA)
POINTS = ellipse_landmarks()


def distance_to_hull(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's distance (px) to the landmarks' filled hull."""
    outside = (blend.hull(landmarks, shape) == 0).astype(np.uint8)
    return cv2.distanceTransform(outside, cv2.DIST_L2, 5)


@pytest.mark.parametrize("seed", range(12))
def test_the_mask_stays_near_the_hull_and_only_masked_pixels_change(seed):
    fake, mask = blend.self_blend(IMAGE, np.random.default_rng(seed), POINTS)
    assert fake.dtype == np.uint8 and fake.shape == IMAGE.shape
    assert mask.dtype == np.float32 and mask.shape == IMAGE.shape[:2]
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    # Zero beyond the furthest the deformation and the blur can move the hull's edge...
    far = distance_to_hull(POINTS, IMAGE.shape[:2]) > blend.reach(POINTS)
    assert far.any() and np.all(mask[far] == 0)
    # ... and the face's centre is blended, at one of the paper's blend ratios.
    assert mask[120, 128] > 0
    assert any(np.isclose(mask.max(), r, atol=1e-6) for r in blend.BLEND_RATIOS)
    # Pixels the mask leaves alone are the original's exactly; the face is altered.
    untouched = mask == 0
    assert np.array_equal(fake[untouched], IMAGE[untouched])
    core = mask >= 0.5 * mask.max()
    assert np.abs(fake[core].astype(int) - IMAGE[core]).mean() > 0.5


def test_a_blend_follows_its_generator():
    def make(seed):
        return blend.self_blend(IMAGE, np.random.default_rng(seed), POINTS)

    (a, mask_a), (b, mask_b) = make(7), make(7)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    others = [make(seed) for seed in range(8, 40)]
    assert all(not np.array_equal(a, fake) for fake, _ in others)
    ratios = {round(float(mask.max()), 2) for _, mask in others}
    assert ratios == {0.25, 0.5, 0.75, 1.0}  # every ratio of the paper's set is drawn
    # The blend ratio and every transform come from the generator: none from global state.
    np.random.seed(0)
    torch.manual_seed(0)
    again, _ = make(7)
    assert np.array_equal(a, again)


def face_crop(k: int) -> np.ndarray:
    """A 128 px crop around the astronaut's face, moved by k and tinted, so each differs."""
    top, left = 50 + 3 * (k % 4), 150 + 2 * (k % 5)
    crop = PHOTO[top:top + 150, left:left + 150].astype(int) + 6 * k - 20
    return cv2.resize(np.clip(crop, 0, 255).astype(np.uint8), (128, 128),
                      interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def face_split(tmp_path_factory) -> Path:
    """A split of face crops without landmarks (like FFHQ): 8 real faces, one real photo of
    the sky (no face) in each split, and 8 fakes (noise)."""
    root = tmp_path_factory.mktemp("sbi")
    raw = root / "raw"
    for folder in ("real", "fake"):
        (raw / folder).mkdir(parents=True)
    for k in range(8):
        Image.fromarray(face_crop(k)).save(raw / "real" / f"face{k}.png")
        noise = np.random.default_rng(k).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(raw / "fake" / f"noise{k}.png")
    for k in range(2):
        sky = cv2.resize(PHOTO[:100, 400 + 20 * k:500 + 20 * k], (128, 128))
        Image.fromarray(sky).save(raw / "real" / f"sky{k}.png")
    make_split(raw, root / "data", val_fraction=0.3, seed=1)
    return root / "data"


def test_images_without_a_face_are_left_out_and_counted(face_split):
    n_skies = 0
    for part in ("train", "val"):
        reals = [s for s in read_manifest(face_split, part) if s.label == 0]
        kept, landmarks, counts = sbi.reals_with_faces(face_split, part)
        skies = [s for s in reals if s.path.name.startswith("sky")]
        n_skies += len(skies)
        assert kept and not any(s.path.name.startswith("sky") for s in kept)
        assert counts["reals"] == len(reals) and counts["no_face"] == len(skies)
        assert len(kept) == len(reals) - len(skies) == len(landmarks)
        for points in landmarks:
            assert points.shape == (68, 2)
            # on the face: inside the image, around the crop's centre
            assert (points >= 0).all() and (points < 128).all()
            assert 30 < points.mean(axis=0)[0] < 100
    assert n_skies == 2


def test_landmarks_are_found_once_and_cached_in_the_split(face_split, monkeypatch):
    reals = [s for s in read_manifest(face_split) if s.label == 0]
    first, counts = sbi.landmarks_of(face_split, reals)
    assert (face_split / LANDMARKS).is_file()
    assert counts["detected"] + counts["cached"] == len(reals)

    from dfutils import faces

    def no_detector(*args, **kwargs):
        raise AssertionError("the detector ran again instead of reading the cache")

    monkeypatch.setattr(faces.FaceFinder, "__init__", no_detector)
    again, counts = sbi.landmarks_of(face_split, reals)
    assert counts["cached"] == len(reals) and counts["detected"] == 0
    assert all((a is None and b is None) or np.array_equal(a, b)
               for a, b in zip(first, again, strict=True))


def test_the_split_owns_the_landmark_cache(face_split, tmp_path):
    """A new split over the same data_dir may replace the cache (it is the split's)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(face_split, data)
    raw = Path(json.loads((data / "split_report.json").read_text())["params"]["raw_dir"])
    assert (data / LANDMARKS).is_file()
    make_split(raw, data, val_fraction=0.4, seed=1, overwrite=True)
    assert not (data / LANDMARKS).exists()


def test_each_training_batch_pairs_a_real_with_its_blend(face_split):
    from dfutils.data import make_loader

    reals, landmarks, _ = sbi.reals_with_faces(face_split, "train")
    transform = eval_transform(64, "resnet18")  # no augmentation: the real comes out as it went in
    pairs = sbi.TrainPairs(reals, landmarks, transform)
    def first_batch():
        torch.manual_seed(0)  # in this process (num_workers=0) the blends draw from it
        return next(iter(make_loader(pairs, 4, shuffle=True, seed=3,
                                     collate_fn=sbi.collate_pairs)))

    images, labels, indices = first_batch()
    assert len(images) == 8 and labels.tolist() == [0.0, 1.0] * 4
    assert torch.equal(indices[0::2], indices[1::2])
    for k in range(4):
        real = transform(load_image(reals[int(indices[2 * k])].path))
        assert torch.equal(images[2 * k], real)
        assert not torch.equal(images[2 * k + 1], real)
    # Every pair comes from a real image: the split's fakes are never drawn.
    assert all(s.label == 0 for s in pairs.samples)
    # The same seed gives the same blends.
    assert torch.equal(first_batch()[0], images)


def test_the_validation_blends_are_the_same_in_every_run(face_split):
    first, _ = sbi.validation_blends(face_split)
    second, _ = sbi.validation_blends(face_split)  # a later run: landmarks from the cache
    n = len(first.samples)
    assert n and len(first) == 2 * n
    for i in range(2 * n):
        a, label, mask = first.image(i)
        b, label_b, mask_b = second.image(i)
        assert np.array_equal(a, b) and label == label_b == (i >= n)
        assert (mask is None) == (i < n) and (mask is None or np.array_equal(mask, mask_b))
    # A blend depends on its image alone, not on which others are in the set.
    fewer, _ = sbi.validation_blends(face_split, limit=1)
    assert np.array_equal(fewer.image(len(fewer.samples))[0], first.image(n)[0])


def test_monitoring_the_self_blends_needs_them():
    with pytest.raises(ParameterError, match="needs fakes"):
        TrainParams(monitor="sbi_auc")
    assert TrainParams(fakes="sbi").monitored == "sbi_loss"
    assert TrainParams(fakes="sbi", monitor="val_auc").monitored == "val_auc"
    assert TrainParams().monitored == "val_loss"


def test_the_feature_cache_is_not_used_with_self_blends():
    frozen = dict(trainable="head", jitter=[0.0, 0.0, 0.0, 0.0], flip=False)
    assert TrainParams(**frozen).caches_features
    assert not TrainParams(**frozen, fakes="sbi").caches_features


@pytest.fixture(scope="module")
def sbi_run(face_split, tmp_path_factory) -> tuple[Path, object]:
    from dfutils.train import train_run

    run = tmp_path_factory.mktemp("sbi-run") / "run"
    params = TrainParams(data_dir=str(face_split), run_dir=str(run), weights=None,
                         trainable="head", image_size=32, batch_size=8, max_epochs=2,
                         num_workers=0, jitter=[0.0, 0.0, 0.0, 0.0], flip=False, fakes="sbi")
    result, figures = train_run(params)
    return run, result


def test_training_on_self_blends_validates_on_both_sets(sbi_run, face_split):
    from dfutils.model import load_checkpoint

    run, result = sbi_run
    for row in result.history:
        assert {"val_loss", "val_auc", "sbi_loss", "sbi_auc"} <= set(row)
    metrics = json.loads((run / "metrics.json").read_text())
    n_val_reals = len(sbi.reals_with_faces(face_split, "val")[0])
    assert metrics["sbi"]["n"] == 2 * n_val_reals  # the reals and one blend of each
    assert metrics["monitor"] == "sbi_loss"
    best = min(result.history, key=lambda r: r["sbi_loss"])
    assert metrics["best_epoch"] == best["epoch"]
    faces = metrics["self_blend_faces"]
    assert faces["train"]["no_face"] + faces["val"]["no_face"] == 2  # the two skies
    # 4 batches of 8 images per epoch: each training real once, with its blend
    n_train = faces["train"]["reals"] - faces["train"]["no_face"]
    assert (run / "self_blends.png").is_file()
    assert load_checkpoint(run / "model.pt").params.fakes == "sbi"
    assert n_train == len(sbi.reals_with_faces(face_split, "train")[0])


def test_any_run_can_be_scored_on_the_self_blends_training_validated_on(sbi_run, face_split):
    """evaluate --split val --self-blends scores the split's reals against the fixed
    validation blends: for the run that trained on them, the numbers its training kept."""
    from conftest import evaluate, tree_digest

    from dfutils.evaluate import report_name
    from dfutils.manifest import read_manifest
    from dfutils.params import EvalParams

    run, _ = sbi_run
    before = tree_digest(face_split)
    report, _ = evaluate(run, face_split, "blends", sweeps={"blur": (0,)}, split="val",
                         self_blends=True, num_workers=0)
    kept = json.loads((run / "metrics.json").read_text())["sbi"]
    assert report["n_images"] == kept["n"] and report["self_blends"]
    assert report["metrics"]["auc"] == pytest.approx(kept["auc"], abs=1e-9)
    assert report["metrics"]["confusion"] == kept["confusion"]
    val_reals = [s for s in read_manifest(face_split, "val") if s.label == 0]
    assert len(report["skipped"]) == len(val_reals) - kept["n"] // 2  # a sky has no face
    written = sorted((run / "eval" / "blends" / "self_blends").rglob("*.png"))
    assert len(written) == kept["n"] // 2 and tree_digest(face_split) == before
    assert report_name(EvalParams(eval_dir=str(face_split), split="val", self_blends=True)
                       ) == "data-val-self-blends"  # beside data-val, not over it
    with pytest.raises(ValueError, match="self_blends needs split=val or split=test"):
        evaluate(run, face_split, "x", self_blends=True)


def test_gradcam_scores_localization_on_the_self_blends(sbi_run, face_split):
    from dfutils.gradcam import SELF_BLENDS_SHOWN, gradcam_run
    from dfutils.params import GradCamParams

    run, _ = sbi_run
    report = gradcam_run(GradCamParams(run_dir=str(run), data_dir=str(face_split), n_images=4,
                                       n_eval=16))
    located = report.metrics["self_blends"]["localization"]
    n_val_reals = len(sbi.reals_with_faces(face_split, "val")[0])
    assert located["n"] == n_val_reals
    assert 0 <= located["pointing_cam"] <= 1 and 0 <= located["pointing_random"] <= 1
    shown = min(SELF_BLENDS_SHOWN, n_val_reals)
    assert len(report.overlays) == 4 + shown
    assert sum(t.startswith("self-blend") for t in report.titles) == shown
    assert len(list((run / "gradcam").glob("self-blend-*.png"))) == shown
    # select="sources": fakes only (this split has no source folders: one source)
    report = gradcam_run(GradCamParams(run_dir=str(run), data_dir=str(face_split), n_images=2,
                                       n_eval=16, select="sources"))
    assert [t.split(" · ")[0] for t in report.titles[:2]] == ["fake", "fake"]


def test_monitor_picks_the_kept_epoch_by_the_named_column(separable_split, tmp_path):
    from dfutils.train import train_run

    params = TrainParams(data_dir=str(separable_split), run_dir=str(tmp_path / "run"),
                         weights=None, trainable="all", image_size=32, batch_size=8,
                         max_epochs=3, num_workers=0, patience=5, monitor="val_auc",
                         lr=1e-2)
    result, _ = train_run(params)
    aucs = [row["val_auc"] for row in result.history]
    assert result.best_epoch == 1 + aucs.index(max(aucs))
    assert result.metrics["monitor"] == "val_auc"


@pytest.mark.parametrize("share,k,blends", [(0.5, 4, 2), (0.25, 4, 1), (1.0, 3, 3),
                                            (0.0, 3, 0), (0.5, 3, 2)])
def test_a_mixed_batch_holds_the_stated_share_each_blend_with_its_real(face_split, share, k,
                                                                        blends):
    from dfutils.data import make_loader

    reals, landmarks, _ = sbi.reals_with_faces(face_split, "train")
    fakes = [s for s in read_manifest(face_split, "train") if s.label == 1]
    transform = eval_transform(64, "resnet18")  # no augmentation: each image as it went in
    mixed = sbi.MixedPairs(reals, landmarks, fakes)

    def first_batch():
        torch.manual_seed(0)  # in this process (num_workers=0) the draws come from it
        return next(iter(make_loader(mixed, k, shuffle=True, seed=3,
                                     collate_fn=sbi.MixedCollate(mixed, share, transform))))

    images, labels, indices = first_batch()
    assert len(images) == 2 * k and labels.tolist() == [0.0, 1.0] * k
    split_fakes = [transform(load_image(s.path)) for s in fakes]
    for i in range(k):
        real, fake = images[2 * i], images[2 * i + 1]
        assert torch.equal(real, transform(load_image(reals[int(indices[2 * i])].path)))
        is_split_fake = any(torch.equal(fake, f) for f in split_fakes)
        assert is_split_fake == (i >= blends)  # the first round(share k) are blends
        if i < blends:  # a blend of its own real: most of it is that real, unchanged
            assert (fake == real).float().mean() > 0.3
    assert torch.equal(first_batch()[0], images)  # the same seed, the same batch


def test_mixed_training_validates_both_families_and_resumes_exactly(face_split, tmp_path,
                                                                    monkeypatch):
    import dfutils.train as T

    settings = {"data_dir": str(face_split), "weights": None, "trainable": "all",
                "image_size": 32, "batch_size": 4, "max_epochs": 3, "patience": 3,
                "num_workers": 0, "seed": 5, "fakes": "sbi+data", "sbi_share": 0.5}

    def run(name: str, **extra):
        return T.train_run(TrainParams.from_mapping(
            {**settings, "run_dir": str(tmp_path / name), **extra}))[0]

    whole = run("whole")
    for row in whole.history:
        assert {"val_auc", "sbi_auc", "mean_loss", "mean_auc"} <= set(row)
        assert row["mean_auc"] == pytest.approx((row["val_auc"] + row["sbi_auc"]) / 2)
    assert whole.metrics["monitor"] == "mean_loss"
    assert whole.best_epoch == 1 + min(range(3), key=lambda e: whole.history[e]["mean_loss"])
    from test_data_and_train import interrupt_epoch

    interrupt_epoch(monkeypatch, 3)
    cut = run("cut")
    assert cut.interrupted and len(cut.history) == 2
    monkeypatch.undo()
    resumed = run("cut", resume=True)

    def strip(history):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
                for row in history]
    assert strip(resumed.history) == strip(whole.history)

    def kept(metrics):  # (where the landmarks came from differs: the cache, the 2nd time)
        return {k: v for k, v in metrics.items() if k != "self_blend_faces"}
    assert kept(resumed.metrics) == kept(whole.metrics)
    weights = [torch.load(tmp_path / n / "model.pt", weights_only=True)["model_state"]
               for n in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_mixed_modes_parameters_are_checked():
    with pytest.raises(ParameterError, match="sbi_share must be between 0 and 1"):
        TrainParams(fakes="sbi+data", sbi_share=1.5)
    with pytest.raises(ParameterError, match="needs fakes"):
        TrainParams(monitor="mean_auc")
    assert TrainParams(fakes="sbi+data").monitored == "mean_loss"
