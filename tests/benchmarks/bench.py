"""make bench: every hot path as a ratio against a baseline measured in the same process.

L, the limit, is a bare ResNet18 forward at 224 px, batch 64, under inference_mode, in the
best memory format for the device. Each figure is the median of several repeats. Results
are printed as a table and written to runs/bench/results.json.

    python tests/benchmarks/bench.py [--quick] [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not progress bars (before tqdm loads)

import cv2
import numpy as np
import torch
from PIL import Image

from dfutils import archs, data
from dfutils.atomic import write_json
from dfutils.cam import GradCAM
from dfutils.detector import OnnxNetwork
from dfutils.distributed import device as default_device
from dfutils.export import export_onnx
from dfutils.images import load_image
from dfutils.manifest import read_manifest
from dfutils.model import Checkpoint, build_model, forward, grad_scaler
from dfutils.params import SplitParams, TrainParams
from dfutils.paths import REPO_ROOT
from dfutils.runs import environment
from dfutils.scoring import score
from dfutils.split import split
from dfutils.train import fit

SHARED = REPO_ROOT.parent / "shared" / "data" / "ffhq-stylegan"


def median_rate(work, n_items: int, repeats: int) -> float:
    """Median items/s of `work()` over `repeats` runs (after one warm-up run)."""
    work()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        rates.append(n_items / (time.perf_counter() - start))
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def limit(device: torch.device, repeats: int) -> tuple[float, str]:
    """L: bare ResNet18 forward, 224 px, batch 64, inference_mode, best memory format."""
    model = build_model("resnet18", None, "all").eval().to(device)
    x = torch.randn(64, 3, 224, 224, device=device)
    best = (0.0, "")
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last",
                                                               torch.channels_last)):
        m, xi = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)

        def forward(m=m, xi=xi):
            with torch.inference_mode():
                m(xi)
            _sync(device)
        rate = median_rate(forward, 64, repeats)
        best = max(best, (rate, name))
    return best


LARGE = ("clip_vit_l14",)  # smaller batches: 0.3 G parameters and their Adam state


def arch_rates(arch: str, device: torch.device, repeats: int) -> list[dict]:
    """L and L_train of one network at the size of its weights: a bare forward under
    inference_mode, and a bare training step of the whole network (forward, loss, backward,
    Adam), on one batch already on the device; in float32 and in mixed precision (bf16 on
    the CPU, "auto" on a GPU), each channels-last and contiguous."""
    entry = archs.get(arch)
    size, large = entry.size, entry.name in LARGE
    batch = ((64 if size <= 224 and not large else 32) if device.type == "cuda"
             else (16 if size <= 224 and not large else 4))
    # A transformer's only convolution is its patch embedding: one layout is enough.
    formats = ((("contiguous", torch.contiguous_format),) if entry.patch else
               (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)))
    rows = []
    for amp in ("off", "auto" if device.type == "cuda" else "bf16"):
        for fmt_name, fmt in formats:
            torch.manual_seed(0)
            model = build_model(arch, None, "all", size).to(device, memory_format=fmt)
            x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
            y = torch.randint(0, 2, (batch,), device=device).float()
            optimizer, scaler = torch.optim.Adam(model.parameters(), 1e-4), grad_scaler(amp, device)

            def infer(model=model, x=x, amp=amp):
                with torch.inference_mode():
                    forward(model.eval(), x, amp=amp)
                _sync(device)

            def step(model=model, x=x, y=y, amp=amp, optimizer=optimizer, scaler=scaler):
                logits, _ = forward(model.train(), x, amp=amp)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                _sync(device)
            rows.append({"arch": arch, "size": size, "batch": batch, "amp": amp,
                         "format": fmt_name, "L": median_rate(infer, batch, repeats),
                         "L_train": median_rate(step, batch, repeats)})
    return rows


def loader_rate(data_dir: Path, repeats: int, **overrides) -> float:
    """Images/s of one pass of the training loader alone (2 workers, no model)."""
    params = TrainParams.from_mapping({"data_dir": str(data_dir), "num_workers": 2,
                                       **overrides})
    loader = data.train_val_loaders(params)[0]
    return median_rate(lambda: sum(1 for _ in loader), len(loader.dataset), repeats)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy(src, dst)


def jpeg_folder(root: Path, n: int) -> Path:
    """Up to n per class of 256 px JPEGs: the benchmark faces when present, else generated."""
    rng = np.random.default_rng(0)
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True)
        if SHARED.is_dir():
            for src in sorted((SHARED / label).iterdir())[:n]:
                _link(src, root / label / src.name)
            continue
        for i in range(n):
            pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
            Image.fromarray(pixels).resize((256, 256), Image.Resampling.BICUBIC).save(
                root / label / f"{i:05d}.jpg", quality=90)
    return root


def train_epoch_rate(data_dir: Path, device: torch.device, **overrides) -> dict:
    """Images/s of training epochs of `fit` (frozen backbone by default), per epoch."""
    params = TrainParams.from_mapping({"data_dir": str(data_dir), "weights": None,
                                       "trainable": "head", "max_epochs": 3, "patience": 3,
                                       "num_workers": 2, **overrides})
    loaders = data.train_val_loaders(params)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = fit(build_model(params.arch, None, params.trainable, params.image_size), *loaders,
                 params, device=device)
    return {"total_s": time.perf_counter() - start, "history": result.history,
            "n_train": len(loaders[0].dataset), "n_val": len(loaders[1].dataset)}


def naive_epoch_rate(data_dir: Path, repeats: int) -> float:
    """The plain way: whole model in train mode, one loader worker, PIL (v1) transforms."""
    from torchvision import transforms as T

    model = build_model("resnet18", None, "head")
    model.train()  # BatchNorm in train mode, as a plain notebook leaves it
    transform = T.Compose([T.Resize((224, 224)), T.ColorJitter(0.2, 0.2, 0.2),
                           T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(archs.IMAGENET_MEAN, archs.IMAGENET_STD)])
    dataset = data.ManifestDataset(read_manifest(data_dir, "train"), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=1)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def epoch():
        for images, labels, _ in loader:
            loss = loss_fn(model(images).squeeze(1), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return median_rate(epoch, len(dataset), max(1, repeats - 2))


def sbi_loading_rates(data_dir: Path, repeats: int) -> dict:
    """Images/s of one pass of the training loader at 128 px (2 workers, no model): the
    split's images, and real/self-blend pairs made from its reals (fakes="sbi"; a fixed
    68-point face in the middle of each image, so no face detection is timed)."""
    from dfutils import sbi

    params = TrainParams(data_dir=str(data_dir), image_size=128, num_workers=2)
    plain = data.train_val_loaders(params)[0]
    reals = [s for s in read_manifest(data_dir, "train") if s.label == 0]
    side = np.asarray(load_image(reals[0].path)).shape[0]
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = side / 2 + np.stack([0.3 * side * np.cos(angles), 0.38 * side * np.sin(angles)], 1)
    transform = data.train_transform(params)
    pairs = data.make_loader(sbi.TrainPairs(reals, [face] * len(reals), transform),
                             params.batch_size // 2, True, 2, collate_fn=sbi.collate_pairs)

    def one_pass(loader):
        return lambda: sum(1 for _ in loader)

    return {"plain": median_rate(one_pass(plain), len(plain.dataset), repeats),
            "pairs": median_rate(one_pass(pairs), 2 * len(reals), repeats)}


def onnx_rates(model: torch.nn.Module, images: data.ImageSet, folder: Path, repeats: int
               ) -> dict:
    """The model exported as `export --onnx` writes it, run by ONNX Runtime on the CPU: a
    bare forward of one batch of 64 already in memory, and predict's scoring of `images`
    (the same loader, 2 workers), with the largest difference in P(fake) from PyTorch."""
    folder.mkdir()
    checkpoint = Checkpoint(model.eval(), TrainParams(weights=None, image_size=224), 0.5, "0.5",
                            0, {}, folder / "model.pt")
    export_onnx(checkpoint, folder / "model.onnx")
    network = OnnxNetwork(folder / "model.onnx")
    x = torch.randn(64, 3, 224, 224)
    forward_rate = median_rate(lambda: network(x), 64, repeats)
    onnx = dataclasses.replace(checkpoint, model=network)
    cpu = torch.device("cpu")
    predict = median_rate(lambda: score(onnx, images, batch_size=64, num_workers=2, device=cpu),
                          len(images), repeats)
    ours = score(checkpoint, images, batch_size=64, num_workers=2, device=cpu).p_fake
    theirs = score(onnx, images, batch_size=64, num_workers=2, device=cpu).p_fake
    return {"forward": forward_rate, "predict": predict,
            "max_difference": float(np.nanmax(np.abs(ours - theirs)))}


def gradcam_rates(device: torch.device, repeats: int) -> dict:
    """Ours vs pytorch-grad-cam on one batch of 32 at 224 px, and ours batched vs one by one."""
    from pytorch_grad_cam import GradCAM as Reference
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    torch.manual_seed(0)
    model = build_model("resnet18", None, "all").eval().to(device)
    x = torch.randn(32, 3, 224, 224, device=device)
    targets = [BinaryClassifierOutputTarget(1)] * 32
    with Reference(model=model, target_layers=[model.layer4[-1]]) as reference:
        theirs_rate = median_rate(lambda: reference(input_tensor=x, targets=targets), 32, repeats)
        theirs = reference(input_tensor=x, targets=targets)
    with GradCAM(model) as cam:
        ours_rate = median_rate(lambda: cam(x, "fake"), 32, repeats)
        single_rate = median_rate(lambda: [cam(x[i:i + 1], "fake") for i in range(32)], 32,
                                  max(1, repeats // 2))
        raw, _, _ = cam.raw(x, "fake")

    def one_by_one_forward():
        with torch.inference_mode():
            for i in range(32):
                model(x[i:i + 1].contiguous(memory_format=torch.channels_last))
    model.to(memory_format=torch.channels_last)
    forward_batch_1 = median_rate(one_by_one_forward, 32, repeats)
    import cv2

    def minmax(a):
        a = a - a.min()
        return a / (1e-7 + a.max())
    ours = np.stack([minmax(cv2.resize(minmax(m), (224, 224))) for m in raw.cpu().numpy()])
    return {"pytorch_grad_cam": theirs_rate, "ours": ours_rate, "ours_one_by_one": single_rate,
            "forward_batch_1": forward_batch_1,
            "max_abs_difference": float(np.abs(ours - theirs).max())}


def explanation_rates(files: list[Path], root: Path, device: torch.device) -> dict:
    """Crops/s of 05-benchmark's explanation pass (Grad-CAM, its measures against 3 random
    maps, deletion) and of plain scoring, on the same files at 224 px, batch 32; each file
    masked on its left half. Once each: the pass is long."""
    from dfutils.benchmark import Group, explain_group
    from dfutils.model import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", build_model("resnet18", None, "all").eval(),
                    params={"image_size": 224, "trainable": "all", "weights": None},
                    threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
    checkpoint = load_checkpoint(root / "model.pt")
    checkpoint.model.to(device)
    mask = np.zeros((224, 224), bool)  # at the model's input side, as loaders give it
    mask[:, :112] = True
    group = Group("bench", "folder", "all", "mask",
                  [lambda size, f=f: (np.array(load_image(f)), mask) for f in files],
                  [f.name for f in files])
    start = time.perf_counter()
    explain_group(checkpoint, group, "last", 32, seed=0)
    explained = len(files) / (time.perf_counter() - start)
    images = data.ImageSet(files, data.eval_transform(224, "resnet18"), 224)
    start = time.perf_counter()
    score(checkpoint.model, images, batch_size=32, num_workers=2, device=device)
    return {"explained": explained, "scored": len(files) / (time.perf_counter() - start),
            "n": len(files)}


def split_rates(root: Path, n: int, repeats: int) -> dict:
    """Our split (threads, full decode, hashing, links) vs a bare single-process PIL decode."""
    raw = jpeg_folder(root / "raw", n)
    files = sorted(raw.rglob("*.jpg"))

    def bare():
        for f in files:
            with Image.open(f) as image:
                image.load()
    runs = iter(range(10_000))

    def ours():  # a new data_dir each time: a re-run over an existing split would do nothing
        split(SplitParams(raw_dir=str(raw), data_dir=str(root / f"data{next(runs)}")))
    return {"n_files": len(files), "bare_loop": median_rate(bare, len(files), repeats),
            "split": median_rate(ours, len(files), repeats)}


CLIPS = REPO_ROOT.parent / "shared" / "data" / "deepfacelive"


def clip_folder(root: Path, n: int) -> Path:
    """Up to n clips per class: the benchmark clips when present, else clips of a face photo
    that scikit-image ships, moved across 60 frames."""
    import skimage.data

    for label in ("real", "fake"):
        (root / label).mkdir(parents=True)
        if CLIPS.is_dir():
            for clip in sorted((CLIPS / label).glob("*.mp4"))[:n]:
                (root / label / clip.name).symlink_to(clip)
            continue
        patch = skimage.data.astronaut()[40:240, 120:330]
        for i in range(n):
            writer = cv2.VideoWriter(str(root / label / f"{i}.mp4"),
                                     cv2.VideoWriter_fourcc(*"mp4v"), 25, (480, 360))
            for k in range(60):
                frame = np.full((360, 480, 3), 30 + 10 * i, np.uint8)
                frame[20 + k:220 + k, 40 + 2 * k:250 + 2 * k] = patch
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
    return root


def faces_rates(root: Path, n_clips: int, repeats: int) -> dict:
    """The faces step in frames/s, in 1 and 2 processes, against its parts measured alone:
    decoding the chosen frames (grab/retrieve), and detecting + landmarking decoded frames."""
    from dfutils import detect, faces, frames
    from dfutils.params import FacesParams

    raw = clip_folder(root / "clips", n_clips)
    clips = sorted(raw.rglob("*.mp4"))
    params = FacesParams(raw_dir=str(raw), faces_dir=str(root / "f"))
    decoded = [f for clip in clips for _, f, _ in frames.read_frames(clip, params.frames_per_video)]
    finder = detect.FaceFinder(params)
    runs = iter(range(10_000))

    def step(workers: int) -> None:  # a new faces_dir each time: a re-run would do nothing
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(root / f"f{next(runs)}")),
                            workers=workers)
    return {"n_frames": len(decoded),
            "decode": median_rate(lambda: [list(frames.read_frames(c, params.frames_per_video))
                                           for c in clips], len(decoded), repeats),
            "detect": median_rate(lambda: [finder(f) for f in decoded], len(decoded), repeats),
            "step_1": median_rate(lambda: step(1), len(decoded), repeats),
            "step_2": median_rate(lambda: step(2), len(decoded), repeats)}


def faces_bookkeeping(root: Path, n_clips: int) -> dict:
    """The faces step's cost per clip beyond decoding and detection, at n_clips one-frame
    64 x 64 clips (copies of one): the whole step in one process against the same clip's
    decode + detect alone, and the merge of two shards, each per clip."""
    from dfutils import detect, faces, shards
    from dfutils.params import FacesParams

    one = root / "one.mp4"
    writer = cv2.VideoWriter(str(one), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 64))
    writer.write(np.full((64, 64, 3), 90, np.uint8))
    writer.release()
    for i in range(n_clips):
        target = root / "raw" / ("real", "fake")[i % 2] / f"{i // 100:03d}" / f"{i}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(one, target)
    params = FacesParams(raw_dir=str(root / "raw"), faces_dir=str(root / "whole"),
                         frames_per_video=1)
    finder = detect.FaceFinder(params)
    alone = median_rate(lambda: [detect.faces_of(one, finder, 1) for _ in range(200)], 200, 3)
    start = time.perf_counter()
    faces.extract_faces(params, workers=1)
    whole = (time.perf_counter() - start) / n_clips
    sharded = dataclasses.replace(params, faces_dir=str(root / "sharded"))
    for k in range(2):
        faces.extract_faces(sharded, workers=1, shard=shards.Shard(k, 2))
    start = time.perf_counter()
    faces.merge_faces(sharded)
    merge = (time.perf_counter() - start) / n_clips
    return {"n_clips": n_clips, "per_clip_ms": 1000 * whole, "work_ms": 1000 / alone,
            "merge_ms": 1000 * merge}


MEMORY_CHILD = """
import sys
from dfutils import data
from dfutils.manifest import read_manifest
from dfutils.model import build_model
from dfutils.params import TrainParams
from dfutils.train import fit
d = sys.argv[1]
p = TrainParams(data_dir=d, weights=None, trainable="head", image_size=64, batch_size=64,
                max_epochs=1, num_workers=0, jitter=[0.2, 0.2, 0.2, 0.0])
tr = data.ManifestDataset(read_manifest(d, "train"), data.train_transform(p))
va = data.ImageSet.of(read_manifest(d, "val"), data.eval_transform(64, "resnet18"), 64)
fit(build_model("resnet18", None, "head"), data.make_loader(tr, 64, True),
    data.make_loader(va, 64, False), p)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def peak_rss_of_linked_sets(root: Path, sizes: tuple[int, int], base: list[Path], child: str,
                            row, *args: str) -> dict:
    """Peak RSS (MiB, VmHWM) of `child` run in a fresh process on each of two folders of n
    links to `base` files, whose manifest lists every link as its own image (links of one
    file are one content, which the split would fold together); `row(i, src)` gives the
    manifest row of link i beyond its path; `args` are the child's further arguments, with
    {n} replaced by the folder's size."""
    out = {}
    for n in sizes:
        folder = root / f"set_{n}"
        folder.mkdir(exist_ok=True)
        rows = []
        for i in range(n):
            src = base[i % len(base)]
            dest = folder / f"{i:06d}.jpg"
            _link(src, dest)
            rows.append({"path": dest.name, **row(i, src)})
        with open(folder / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        done = subprocess.run([sys.executable, "-c", child, str(folder),
                               *(a.format(n=n) for a in args)],
                              capture_output=True, text=True, check=True)
        out[n] = int(done.stdout.strip().splitlines()[-1]) / 1024  # kB
    return out


def memory(root: Path, sizes: tuple[int, int]) -> dict:
    """Peak RSS (MiB) of one training epoch at two data-set sizes, the larger made by links."""
    base = sorted(jpeg_folder(root / "base", sizes[0] // 2).rglob("*.jpg"))
    return peak_rss_of_linked_sets(
        root, sizes, base, MEMORY_CHILD,
        lambda i, src: {"label": src.parent.name, "split": "val" if i % 5 == 0 else "train",
                        "mask": ""})


BENCHMARK_CHILD = """
import sys
from pathlib import Path
from dfutils.benchmark import run_benchmark
from dfutils.model import build_model, save_checkpoint
from dfutils.params import BenchmarkParams
d, run = sys.argv[1], Path(sys.argv[2])
save_checkpoint(run / "model.pt", build_model("resnet18", None, "head"),
                params={"image_size": 64}, threshold=0.5, threshold_rule="0.5", metrics={}, epoch=1)
run_benchmark(BenchmarkParams(run_dir=str(run), test_sets=[d], batch_size=64, num_workers=0,
                              n_bootstrap=100, n_explain=0))  # scoring's memory alone
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def benchmark_memory(root: Path, sizes: tuple[int, int]) -> dict:
    """Peak RSS (MiB) of 05-benchmark's scoring at two test-set sizes (8 frames per clip,
    the larger made by links), each in a fresh process."""
    base = sorted(jpeg_folder(root / "base", 100).rglob("*.jpg"))

    def row(i: int, src: Path) -> dict:
        flip = {"real": "fake", "fake": "real"}
        label = src.parent.name if i // 8 % 2 == 0 else flip[src.parent.name]
        return {"label": label, "split": "test", "mask": "",
                "video": f"clip{i // 8}" if label == "real" else f"fakeclip{i // 8}"}

    for n in sizes:  # the child reads the split's report beside its manifest
        (root / f"set_{n}").mkdir()
        (root / f"set_{n}" / "split_report.json").write_text('{"faces": null, "faceless": []}')
    return peak_rss_of_linked_sets(root, sizes, base, BENCHMARK_CHILD, row,
                                   str(root / "run_{n}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    n_per_class = 100 if args.quick else 300
    device = default_device()
    results: dict = {"environment": environment(), "device": str(device)}
    rows = []

    def row(case, value, unit, ratio=None, target=None):
        rows.append((case, value, unit, ratio, target))
        results.setdefault("cases", {})[case] = {"value": value, "unit": unit, "ratio": ratio,
                                                 "target": target}
        print(f"{case:44s} {value:10.2f} {unit:8s}"
              + (f"  ratio {ratio:7.2f}" if ratio is not None else "")
              + (f"  (target {target})" if target else ""), flush=True)

    # The split first, while this process is small: its worker processes are forked, and
    # forking a process that has grown to gigabytes (as this one does) costs more than
    # forking a notebook kernel, which is where users run it.
    with tempfile.TemporaryDirectory() as tmp:
        splits = split_rates(Path(tmp), 500 if args.quick else 1100, repeats)
    row(f"split, {splits['n_files']} files (bare PIL decode loop: "
        f"{splits['bare_loop']:.0f}/s)", splits["split"], "files/s",
        splits["split"] / splits["bare_loop"], ">= 1.5x the bare loop")

    with tempfile.TemporaryDirectory() as tmp:
        rates = faces_rates(Path(tmp), 3 if args.quick else 8, repeats)
    slower = min(rates["decode"], rates["detect"])
    row(f"faces: decode chosen frames alone ({rates['n_frames']} frames)", rates["decode"],
        "frames/s")
    row("faces: detect + landmark decoded frames alone", rates["detect"], "frames/s")
    row("faces step, 1 process", rates["step_1"], "frames/s", rates["step_1"] / slower,
        ">= 0.8 of the slower part")
    row("faces step, 2 processes", rates["step_2"], "frames/s",
        rates["step_2"] / rates["step_1"], "near 2x one process")
    with tempfile.TemporaryDirectory() as tmp:
        kept = faces_bookkeeping(Path(tmp), 1000 if args.quick else 10_000)
    row(f"faces step per tiny clip, {kept['n_clips']} clips (its decode + detect alone "
        f"{kept['work_ms']:.2f} ms)", kept["per_clip_ms"], "ms", kept["per_clip_ms"]
        / kept["work_ms"])
    row("  bookkeeping per clip (the step less decode + detect)",
        kept["per_clip_ms"] - kept["work_ms"], "ms")
    row("  merging two shards, per clip", kept["merge_ms"], "ms")

    L, fmt = limit(device, repeats)
    results["limit_memory_format"] = fmt
    row(f"L: ResNet18 forward, 224 px, batch 64 ({fmt})", L, "img/s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = jpeg_folder(tmp / "raw", n_per_class)
        split(SplitParams(raw_dir=str(raw), data_dir=str(tmp / "data")))
        small = jpeg_folder(tmp / "raw-small", 40)  # the epochs of the larger networks
        split(SplitParams(raw_dir=str(small), data_dir=str(tmp / "small")))
        aug = train_epoch_rate(tmp / "data", device, max_epochs=2)
        rate = statistics.median(h["images_per_s"] for h in aug["history"])
        row("train, frozen backbone, with augmentation", rate, "img/s", rate / L, ">= 0.9")
        # The loader alone: what it costs the cores that the forward pass also uses.
        R = loader_rate(tmp / "data", max(1, repeats - 2))
        row("  the training loader alone, 224 px, augmented", R, "img/s", R / L, "of L")

        plain = train_epoch_rate(tmp / "data", device, max_epochs=2, jitter=[0.0] * 4,
                                 flip=False, feature_cache=False)
        cached = train_epoch_rate(tmp / "data", device, max_epochs=4, jitter=[0.0] * 4,
                                  flip=False, feature_cache=True)
        uncached_s = statistics.median(h["seconds"] for h in plain["history"])
        cached_s = statistics.median(h["seconds"] for h in cached["history"][1:])
        row("train, frozen, no augmentation: cached epoch", cached_s * 1000, "ms",
            uncached_s / cached_s, ">= 100x an uncached epoch")

        loading = sbi_loading_rates(tmp / "data", max(1, repeats - 2))
        row("training loader, 128 px: the split's images", loading["plain"], "img/s")
        row("training loader, 128 px: real/self-blend pairs", loading["pairs"], "img/s",
            loading["pairs"] / loading["plain"], "what fakes=\"sbi\" costs in loading")

        naive = naive_epoch_rate(tmp / "data", repeats)
        row("the original recipe's naive frozen epoch", naive, "img/s", rate / naive, "ours faster")

        files = sorted((tmp / "raw").rglob("*.jpg"))
        model = build_model("resnet18", None, "head")
        images = data.ImageSet(files, data.eval_transform(224, "resnet18"), 224)
        predict = median_rate(lambda: score(model, images, batch_size=64, num_workers=2,
                                            device=device), len(files), max(1, repeats - 2))
        row("predict from JPEG files", predict, "img/s", predict / L, ">= 0.85")
        onnx = onnx_rates(model, images, tmp / "onnx", max(1, repeats - 2))
        row("  ONNX Runtime: bare forward, 224 px, batch 64", onnx["forward"], "img/s",
            onnx["forward"] / L, "of L (PyTorch)")
        row("predict from JPEG files through ONNX Runtime", onnx["predict"], "img/s",
            onnx["predict"] / L, "of L")
        row("  predict: ONNX Runtime against PyTorch", onnx["predict"], "img/s",
            onnx["predict"] / predict, "x PyTorch")
        results["onnx_max_difference"] = onnx["max_difference"]

        cams = gradcam_rates(device, repeats)
        row("Grad-CAM, pytorch-grad-cam, batch 32", cams["pytorch_grad_cam"], "img/s")
        row("Grad-CAM, ours, batch 32", cams["ours"], "img/s",
            cams["ours"] / cams["pytorch_grad_cam"], ">= 2.5x pytorch-grad-cam")
        row("Grad-CAM, ours, one image at a time", cams["ours_one_by_one"], "img/s",
            cams["ours"] / cams["ours_one_by_one"], "batched >= 4x")
        row("bound: bare forward, batch 1 (vs batch 64 = L)", cams["forward_batch_1"], "img/s",
            L / cams["forward_batch_1"], "what batching can gain at most")
        results["gradcam_max_abs_difference"] = cams["max_abs_difference"]
        print(f"  Grad-CAM maps: max |ours - pytorch-grad-cam| = {cams['max_abs_difference']:.2e}")

        (tmp / "explain").mkdir()
        explained = explanation_rates(files[:32], tmp / "explain", device)
        results["explanations"] = explained
        row(f"benchmark: plain scoring of {explained['n']} crops, 224 px, batch 32",
            explained["scored"], "img/s")
        row("benchmark: the explanation pass (Grad-CAM, measures, deletion) on them",
            explained["explained"], "img/s", explained["scored"] / explained["explained"],
            "x slower than scoring (~25 forwards a crop)")


        sizes = (1000, 4000) if args.quick else (2000, 20000)
        rss = memory(tmp / "memory", sizes)
        row(f"peak RSS, epoch over {sizes[0]} images", rss[sizes[0]], "MiB")
        row(f"peak RSS, epoch over {sizes[1]} images", rss[sizes[1]], "MiB",
            rss[sizes[1]] / rss[sizes[0]], "~1 (no growth)")

        sizes = (800, 4000) if args.quick else (2000, 20000)
        rss = benchmark_memory(tmp / "benchmark", sizes)
        row(f"peak RSS, benchmark of {sizes[0] // 8} clips x 8 frames", rss[sizes[0]], "MiB")
        row(f"peak RSS, benchmark of {sizes[1] // 8} clips x 8 frames", rss[sizes[1]], "MiB",
            rss[sizes[1]] / rss[sizes[0]], "~1 (streamed)")

        # Each network at the size of its weights: L and L_train, float32 and mixed
        # precision, channels-last and contiguous; then a whole `fit` epoch (all layers,
        # augmented) as a share of the best L_train in float32.
        results["archs"] = []
        for arch in archs.ARCHS:
            cases = arch_rates(arch, device, max(1, repeats - 2))
            results["archs"] += cases
            for c in cases:
                row(f"{arch} {c['size']} px, batch {c['batch']}, amp {c['amp']}, "
                    f"{c['format']}: L", c["L"], "img/s")
                row("  L_train (forward, backward, Adam step)", c["L_train"], "img/s",
                    c["L_train"] / c["L"], "of its L")
            best = max(c["L_train"] for c in cases if c["amp"] == "off")
            best_l = max(c["L"] for c in cases if c["amp"] == "off")
            size, batch = archs.get(arch).size, cases[0]["batch"]
            if archs.get(arch).patch:
                # A transformer's recipe is a linear probe (UnivFD): the frozen network's
                # features once (the first epoch, as fast as L at best), then the head alone
                # on them (the second epoch).
                epoch = train_epoch_rate(tmp / "data", device, max_epochs=2, arch=arch,
                                         trainable="head", image_size=size, batch_size=batch,
                                         jitter=[0.0] * 4, flip=False)
                epochs_s = sum(h["seconds"] for h in epoch["history"])
                features = (epoch["n_train"] + epoch["n_val"]) / (epoch["total_s"] - epochs_s)
                cached = epoch["history"][-1]["images_per_s"]
                results.setdefault("probes", []).append(
                    {"arch": arch, "features": features, "cached_epoch": cached, "L": best_l})
                row(f"{arch}: linear probe, features of train and val (once, from JPEG files)",
                    features, "img/s", features / best_l, "of L (float32)")
                row(f"{arch}: linear probe, an epoch on the cached features", cached, "img/s",
                    cached / best_l, "x L (float32)")
                continue
            # The second epoch (the first pays for starting the workers and the kernels'
            # first calls); at least 10 batches of L_train's size.
            epoch = train_epoch_rate(tmp / ("data" if batch > 4 else "small"), device,
                                     max_epochs=2, arch=arch, trainable="all",
                                     image_size=size, batch_size=batch)
            epoch_rate = epoch["history"][-1]["images_per_s"]
            row(f"{arch}: a fit epoch, all layers, augmented, {size} px", epoch_rate, "img/s",
                epoch_rate / best, "of L_train (float32)")
    results["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(REPO_ROOT / "runs" / "bench" / "results.json", results)
    print(f"written: {REPO_ROOT / 'runs' / 'bench' / 'results.json'}")


if __name__ == "__main__":
    main()
