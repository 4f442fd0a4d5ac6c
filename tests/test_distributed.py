"""`python -m dfutils train`, alone and under torchrun with 2 CPU processes (gloo)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import make_raw, make_split

pytestmark = pytest.mark.distributed
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training (no augmentation, frozen BatchNorm) in 1 and in 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    make_raw(root / "raw", 20, 20, separable=True)
    make_split(root / "raw", root / "data", seed=0)  # 32 train, 8 validation images
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "weights": None, "trainable": "head", "image_size": 32, "batch_size": 8,
        "max_epochs": 3, "patience": 3, "lr": 0.01, "num_workers": 0, "seed": 0,
        "jitter": [0.0] * 4, "flip": False, "feature_cache": False,
        "n_images": 4,  # a key of 03-gradcam: passed over by `train`
    }))
    out = {}
    for name, prefix in (("single", [sys.executable, "-m", "dfutils"]),
                         ("ddp", [*TORCHRUN, "-m", "dfutils"])):
        done = subprocess.run([*prefix, "train", "--params", str(params),
                               "--set", f"data_dir={root / 'data'}",
                               "--set", f"run_dir={root / name}"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = root / name
    return out


def test_both_runs_write_the_same_files(runs):
    def name(p, d):  # TensorBoard names its event file after the host, the time and the pid
        return ("tensorboard/<events>" if p.parent.name == "tensorboard"
                else p.relative_to(d).as_posix())
    names = {key: sorted(name(p, d) for p in d.rglob("*") if p.is_file())
             for key, d in runs.items()}
    assert names["single"] == names["ddp"]
    assert {"model.pt", "history.csv", "metrics.json", "val_predictions.csv", "run.json",
            "curves.png", "tensorboard/<events>"} <= set(names["ddp"])
    assert names["ddp"].count("tensorboard/<events>") == 1  # rank 0's only


def test_two_processes_match_one_with_the_same_global_batch(runs):
    weights = {name: torch.load(d / "model.pt", weights_only=True)["model_state"]["fc.weight"]
               for name, d in runs.items()}
    torch.testing.assert_close(weights["ddp"], weights["single"], atol=1e-5, rtol=1e-4)
    metrics = {name: json.loads((d / "metrics.json").read_text()) for name, d in runs.items()}
    assert metrics["ddp"]["n"] == metrics["single"]["n"] == 8  # the whole split, once each
    for key in ("val_loss", "auc", "accuracy"):
        assert metrics["ddp"][key] == pytest.approx(metrics["single"][key], abs=1e-5)
    record = json.loads((runs["ddp"] / "run.json").read_text())
    assert record["steps"]["02-train"]["world_size"] == 2


def test_a_batch_that_does_not_divide_is_refused(tmp_path, runs):
    done = subprocess.run([*TORCHRUN, "-m", "dfutils", "train", "--set", "batch_size=7",
                           "--set", f"data_dir={runs['single'].parent / 'data'}",
                           "--set", f"run_dir={tmp_path / 'x'}", "--set", "weights=None"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "batch_size 7 does not divide over 2" in done.stderr


def test_a_failing_rank_ends_the_job_with_an_error_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from dfutils import distributed
        with distributed.session() as (rank, size):
            if rank == 1:
                raise RuntimeError("rank 1 fails")
            dist.barrier()  # rank 0 waits here for a rank that is gone
    """))
    done = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "rank 1 fails" in done.stderr
