"""The faces step over the tasks of a cluster job (dfutils.shards): the partition, the
scheduler's environment, the merge against a single run, and a killed run's resume."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import frame_of, one_line_error, write_clip

from dfutils import faces, frames, paths, shards
from dfutils.__main__ import main
from dfutils.model import build_model, save_checkpoint
from dfutils.params import FacesParams

PARAMS = {"frames_per_video": 3, "face_size": 48}
WORDS = [f"{k.upper()}={v}" for k, v in PARAMS.items()]


def leaves(value, path: str = ""):
    """(path, value) for each number or string in nested JSON."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}/{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from leaves(inner, f"{path}/{i}")
    else:
        yield path, value


def contents(root: Path) -> dict[str, str]:
    """Every file under root with its content hash, but the run record a command keeps
    beside its output (faces-run/: when it ran, not what it made)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != paths.FACES_RUN}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Eight clips, two photos and an unreadable clip, over both classes."""
    root = tmp_path_factory.mktemp("cluster") / "raw"
    for i in range(4):
        write_clip(root / "real" / f"r{i}.mp4", 4, shade=40 + 10 * i)
        write_clip(root / "fake" / "swaps" / f"f{i}.mp4", 4, shade=90 + 10 * i)
    cv2.imwrite(str(root / "real" / "photo.jpg"), cv2.cvtColor(frame_of(1)[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "fake" / "photo.png"),
                cv2.cvtColor(frame_of(2, shade=150)[0], cv2.COLOR_RGB2BGR))
    (root / "fake" / "broken.mp4").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def single(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "faces"
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS))
    return out


def run_cli(*words: str) -> int:
    return main(list(words))


def test_the_partition_is_stable_when_files_are_added():
    keys = [f"real/clip_{i}.mp4" for i in range(2000)]
    before = {key: shards.owner(key, 7) for key in keys}
    after = {key: shards.owner(key, 7) for key in [*keys, "real/new.mp4", "fake/x/new.mp4"]}
    assert all(after[key] == owner for key, owner in before.items())  # nobody moved
    sizes = np.bincount(list(before.values()), minlength=7)
    assert sizes.min() > 2000 / 7 * 0.8  # and the shards are near even


@pytest.mark.parametrize("environ,expected", [
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "64", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, shards.Shard(5, 64)),  # the array wins
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
     shards.Shard(3, 4)),  # --array=1-4
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "RANK": "0", "WORLD_SIZE": "1"},
     shards.Shard(2, 3)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, shards.Shard(1, 2)),
])
def test_the_schedulers_environment_gives_the_shard(environ, expected):
    assert shards.resolve("auto", environ) == expected
    assert shards.resolve("0/9", environ) == shards.Shard(0, 9)  # given by hand, it wins
    assert shards.resolve("", environ) is None


@pytest.mark.parametrize("text,environ,words", [
    ("3/3", {}, "SHARD='3/3'"), ("x", {}, "i/n"), ("-1/2", {}, "i/n"),
    ("auto", {}, "no scheduler's variables"),
    # Issue 36, item 2: what SLURM sets for `sbatch --array=17` (one task run again): it
    # was taken for shard 0/1 and cropped the whole data set
    ("auto", {"SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_COUNT": "1",
              "SLURM_ARRAY_TASK_MIN": "17", "SLURM_ARRAY_TASK_MAX": "17"},
     "one element of an array submitted on its own.*give SHARD=i/n"),
    # --array=1-63:2 mapped task 3 to shard 2 of 32
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "32",
              "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "63",
              "SLURM_ARRAY_TASK_STEP": "2"}, "a step or gaps"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
              "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9"}, "a step or gaps"),
    # an element without its count fell through to SLURM_PROCID's 0 of 1
    ("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     "without SLURM_ARRAY_TASK_COUNT"),
    ("auto", {"RANK": "a", "WORLD_SIZE": "2"}, "RANK='a'"),
])
def test_a_bad_shard_is_named(text, environ, words):
    with pytest.raises(shards.ShardError, match=words):
        shards.resolve(text, environ)


SCHEDULERS = {  # the variables each scheduler sets for task k of n
    "slurm-array": lambda k, n: {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": str(n),
                                 "SLURM_ARRAY_TASK_MIN": "0", "SLURM_PROCID": "0",
                                 "SLURM_NTASKS": "1"},
    "srun": lambda k, n: {"SLURM_PROCID": str(k), "SLURM_NTASKS": str(n)},
    "torchrun": lambda k, n: {"RANK": str(k), "WORLD_SIZE": str(n), "LOCAL_RANK": str(k)},
}


@pytest.mark.parametrize("scheduler,n", [("slurm-array", 2), ("srun", 3), ("torchrun", 3)])
def test_sharded_runs_merge_to_the_bytes_of_a_single_run(raw, single, tmp_path, monkeypatch,
                                                         scheduler, n):
    out = tmp_path / "faces"
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    for k in range(n):
        with monkeypatch.context() as m:
            for name, value in SCHEDULERS[scheduler](k, n).items():
                m.setenv(name, value)
            assert run_cli("faces", f"RAW_DIR={raw}", f"FACES_DIR={out}", "SHARD=auto",
                           *WORDS) == 0
        part = out / paths.FACES_PARTS / f"{k}-of-{n}"
        seen += [json.loads(line)["key"] for line in
                 (part / "journal.jsonl").read_text().splitlines()[1:]]
        assert not (out / paths.FACES).exists()  # a shard writes only its part
    assert sorted(seen) == sorted(e["source"] for e in faces.read_report(single)["sources"])
    assert run_cli("merge", "faces", f"RAW_DIR={raw}", f"FACES_DIR={out}", *WORDS) == 0
    assert contents(out) == contents(single)  # crops, faces.csv and report, byte for byte
    assert not (out / paths.FACES_PARTS).exists()
    record = json.loads((out / paths.FACES_RUN / paths.RUN_RECORD).read_text())
    assert record["steps"]["00-faces"]["status"] == "done"  # the merge finished the step
    assert record["steps"]["00-faces"]["metrics"]["n_crops"] == faces.read_report(
        single)["n_crops"]


def shard_all(raw: Path, out: Path, n: int, changed: dict | None = None) -> None:
    changed = changed or {}
    for k in range(n):
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out),
                                        **{**PARAMS, **changed.get(k, {})}),
                            workers=1, shard=shards.Shard(k, n))


def test_merge_names_a_missing_a_foreign_and_a_half_written_shard(raw, tmp_path, capsys):
    out = tmp_path / "faces"
    shard_all(raw, out, 4, {1: {"face_margin": 1.5}})
    parts = out / paths.FACES_PARTS
    (parts / "2-of-4" / "done.json").unlink()  # as a kill mid-shard leaves it
    journal = parts / "2-of-4" / "journal.jsonl"
    journal.write_text(journal.read_text()[:-20])  # with its last line cut short
    shutil.rmtree(parts / "3-of-4")
    before = contents(out)
    assert run_cli("merge", "faces", f"RAW_DIR={raw}", f"FACES_DIR={out}", *WORDS) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "shard 1/4 was made with other parameters (face_margin)" in error
    assert "shard 2/4 is not complete" in error and "SHARD=2/4" in error
    assert "shard 3/4 is missing" in error and "shard 0/4" not in error
    assert contents(out) == before  # nothing changed
    for k in (1, 2, 3):  # re-running one shard replaces only it
        kept = {p: h for p, h in contents(out).items() if not p.startswith(f"parts/{k}-of-4")}
        faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS),
                            workers=1, shard=shards.Shard(k, 4))
        assert {p: h for p, h in contents(out).items() if p in kept} == kept
    assert faces.merge_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS))


def test_merge_refuses_shards_made_before_the_inputs_changed(raw, tmp_path):
    moved = tmp_path / "raw"
    shutil.copytree(raw, moved)
    out = tmp_path / "faces"
    shard_all(moved, out, 2)
    write_clip(moved / "real" / "late.mp4", 4, shade=70)
    with pytest.raises(faces.FacesError, match="made from other inputs"):
        faces.merge_faces(FacesParams(raw_dir=str(moved), faces_dir=str(out), **PARAMS))


def test_merge_without_shards_and_with_two_jobs_says_what_to_do(raw, tmp_path):
    out = tmp_path / "faces"
    params = FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS)
    with pytest.raises(faces.FacesError, match="holds no shards to merge"):
        faces.merge_faces(params)
    faces.extract_faces(params, workers=1, shard=shards.Shard(0, 2))
    faces.extract_faces(params, workers=1, shard=shards.Shard(0, 3))
    with pytest.raises(faces.FacesError, match="jobs of 2 and 3 tasks"):
        faces.merge_faces(params)


def test_a_killed_faces_run_resumes_without_decoding_the_finished_clips(raw, single, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "faces"
    command = [sys.executable, "-m", "dfutils", "faces", f"RAW_DIR={raw}", f"FACES_DIR={out}",
               *WORDS]
    journal = out / paths.FACES_PARTS / "0-of-1" / "journal.jsonl"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and not (
                journal.exists() and len(journal.read_text().splitlines()) >= 4):
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the runner and its workers, mid-way
        process.wait()
    finished = [json.loads(line)["key"] for line in journal.read_text().splitlines()[1:]
                if line.strip()]
    assert 3 <= len(finished) < 11, "the run was not killed mid-way"
    assert not (out / paths.FACES).exists()

    decoded = []
    real_faces_of = faces.faces_of
    monkeypatch.setattr(faces, "faces_of", lambda path, *a: decoded.append(path.relative_to(
        raw).as_posix()) or real_faces_of(path, *a))
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS), workers=1)
    assert not set(decoded) & set(finished) and len(decoded) + len(finished) == 11
    assert contents(out) == contents(single)


def test_a_frame_over_the_detection_cap_is_scaled_down_and_said(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_clip(raw / "real" / "a.mp4", 2)
    write_clip(raw / "fake" / "b.mp4", 2, shade=90)
    plain = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "plain"),
                                            **PARAMS), workers=1)
    monkeypatch.setattr(frames, "DETECT_PIXELS", 250 * 300)  # frames are 300 x 360
    capped = faces.extract_faces(FacesParams(raw_dir=str(raw),
                                             faces_dir=str(tmp_path / "capped"), **PARAMS),
                                 workers=1)
    entry = next(e for e in capped["sources"] if e["source"] == "real/a.mp4")
    assert "scaled by 0.833 before detection" in entry["downscaled"]
    assert "downscaled" not in next(e for e in plain["sources"] if e["source"] == "real/a.mp4")
    plain_rows, capped_rows = (faces.read_faces(tmp_path / f) for f in ("plain", "capped"))
    assert plain_rows.keys() == capped_rows.keys()
    for path in plain_rows:  # the box stays in the source's pixels
        centres = [np.reshape(rows[path]["box"], (2, 2)).mean(axis=0)
                   for rows in (capped_rows, plain_rows)]  # (in the detector's: 20 px off)
        assert np.abs(centres[0] - centres[1]).max() < 10


def test_a_clip_over_the_pixel_cap_is_refused_before_decoding(tmp_path, small_pixel_limit):
    raw = tmp_path / "raw"
    write_clip(raw / "real" / "a.mp4", 2)
    (raw / "fake").mkdir()
    report = faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(tmp_path / "f"),
                                             **PARAMS), workers=1)
    reason = report["unreadable"][0]["reason"]
    assert reason.startswith("frames of 360 x 300 pixels are over the cap of 500")


def test_frames_decoded_ahead_stop_with_the_consumer_and_carry_errors():
    def decoded():
        yield 1
        yield 2
        raise frames.UnreadableClip("broken at frame 3")

    assert next(iter(frames.ahead(iter(range(10**6))))) == 0  # stops without draining
    with pytest.raises(frames.UnreadableClip, match="frame 3"):
        list(frames.ahead(decoded()))


@pytest.fixture(scope="module")
def face_run(raw, tmp_path_factory) -> Path:
    """A run whose (random, 32 px) model was 'trained' on crops made with PARAMS."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("face_run") / "run"
    recorded = faces.recorded(FacesParams(raw_dir=str(raw), **PARAMS), raw)
    save_checkpoint(run / paths.MODEL, build_model("resnet18", None, "all").eval(),
                    params={"image_size": 32, "trainable": "all"}, threshold=0.5,
                    threshold_rule="0.5", metrics={}, epoch=1, faces=recorded)
    return run


def in_tasks(monkeypatch, scheduler: str, n: int, *words: str) -> None:
    """The command `words`, run as each of the n tasks of `scheduler` in turn."""
    for k in range(n):
        with monkeypatch.context() as m:
            for name, value in SCHEDULERS[scheduler](k, n).items():
                m.setenv(name, value)
            assert run_cli(*words) == 0


def test_sharded_predict_merges_to_the_csvs_of_a_single_run(raw, face_run, tmp_path,
                                                           monkeypatch):
    def predict(out: Path, *extra: str) -> list[str]:
        return ["predict", "--run", str(face_run), str(raw), "--out", str(out),
                "--frames-out", str(out.with_suffix(".frames.csv")), *extra]

    assert run_cli(*predict(tmp_path / "one.csv")) == 0
    in_tasks(monkeypatch, "torchrun", 3, *predict(tmp_path / "sharded.csv", "--shard", "auto"))
    assert not (tmp_path / "sharded.csv").exists()
    assert sorted(p.name for p in (tmp_path / "sharded.csv.parts").iterdir()) == [
        "0-of-3", "1-of-3", "2-of-3"]
    assert run_cli("merge", "predict", "--out", str(tmp_path / "sharded.csv")) == 0
    for suffix in (".csv", ".frames.csv"):
        assert (tmp_path / f"sharded{suffix}").read_bytes() == (
            tmp_path / f"one{suffix}").read_bytes()
    assert not (tmp_path / "sharded.csv.parts").exists()


def test_merging_predict_names_a_missing_shard_and_one_made_otherwise(raw, face_run, tmp_path,
                                                                      capsys):
    out = tmp_path / "p.csv"
    for k, extra in ((0, []), (1, ["--layer", "layer3"])):  # 2/3 never ran
        assert run_cli("predict", "--run", str(face_run), str(raw), "--out", str(out),
                       "--shard", f"{k}/3", *extra) == 0
    capsys.readouterr()
    assert run_cli("merge", "predict", "--out", str(out)) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "shard 1/3 was made with other parameters than shard 0/3 (layer)" in error
    assert "shard 2/3 is missing: run it again (--shard 2/3)" in error
    assert not out.exists()
    assert run_cli("predict", "--run", str(face_run), str(raw), "--out", str(out),
                   "--shard", "0/3") == 0  # a task run again replaces its own part
    mine = tmp_path / "q.csv.parts" / "0-of-2"  # a user's folder that bears a part's name
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text('{"my": "notes"}')
    capsys.readouterr()
    assert run_cli("predict", "--run", str(face_run), str(raw), "--out",
                   str(tmp_path / "q.csv"), "--shard", "0/2") == 2
    assert f"{mine} holds files but no journal" in one_line_error(capsys.readouterr().err)
    assert (mine / "notes.txt").read_text() == '{"my": "notes"}'


def test_sharded_evaluate_merges_to_the_report_of_a_single_run(raw, face_run, monkeypatch):
    def evaluate(name: str, *extra: str) -> list[str]:
        return ["evaluate", "--run", str(face_run), "--data", str(raw), "--name", name,
                "--batch-size", "8", *extra]

    assert run_cli(*evaluate("one")) == 0
    in_tasks(monkeypatch, "slurm-array", 2, *evaluate("sharded", "--shard", "auto"))
    sharded = face_run / paths.EVAL / "sharded"
    assert not (sharded / paths.EVAL_REPORT).exists()
    assert run_cli("merge", "evaluate", "--run", str(face_run), "--name", "sharded") == 0
    one = face_run / paths.EVAL / "one"
    reports = [json.loads((folder / paths.EVAL_REPORT).read_text()) for folder in (one, sharded)]
    assert reports[0].pop("name") == "one" and reports[1].pop("name") == "sharded"
    # The metrics over the merged scores, intervals and all; equal to float32's last digits
    # (a network's output depends a little on the batch it is computed in).
    flat = [dict(leaves(report)) for report in reports]
    assert flat[1] == pytest.approx(flat[0], abs=1e-6)
    assert reports[1]["metrics"]["auc"] == reports[0]["metrics"]["auc"]
    assert contents(sharded / paths.EVAL_FACES) == contents(one / paths.EVAL_FACES)
    assert not (sharded / paths.EVAL_PARTS).exists()


def test_sharded_evaluate_of_a_split_merges_to_the_single_runs_metrics(run_dir,
                                                                       separable_split,
                                                                       monkeypatch):
    def evaluate(name: str, *extra: str) -> list[str]:
        return ["evaluate", "--run", str(run_dir), "--data", str(separable_split), "--split",
                "val", "--name", name, *extra]

    assert run_cli(*evaluate("one")) == 0
    in_tasks(monkeypatch, "srun", 3, *evaluate("sharded", "--shard", "auto"))
    assert run_cli("merge", "evaluate", "--run", str(run_dir), "--name", "sharded") == 0
    one, sharded = (dict(leaves(json.loads((run_dir / paths.EVAL / name / paths.EVAL_REPORT
                                            ).read_text()))) for name in ("one", "sharded"))
    assert one.pop("/name") == "one" and sharded.pop("/name") == "sharded"
    assert sharded == pytest.approx(one, abs=1e-6)


def test_the_docs_slurm_array_runs_as_written_and_merges_to_a_single_run(raw, single,
                                                                        tmp_path):
    """docs/cluster.md's faces.sbatch, run by hand for each task as the page shows, then its
    merge: only the data set's paths are replaced by this test's."""
    page = (paths.REPO_ROOT / "docs" / "cluster.md").read_text()
    script, commands, loop = (block for block in re.findall(r"```bash\n(.*?)```", page, re.S)
                              if "SBATCH" in block or "faces-merge" in block
                              or "for i in" in block)
    ours = f"RAW_DIR={raw} FACES_DIR={tmp_path / 'faces'} " + " ".join(WORDS)
    data = "DATASET=dfdc RAW_DIR=/shared/dfdc FACES_DIR=/shared/faces/dfdc"
    assert data in script and data in commands
    (tmp_path / "faces.sbatch").write_text(script.replace(data, ours))
    merge = next(line for line in commands.splitlines() if "faces-merge" in line)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
    for line in (loop.replace("faces.sbatch", str(tmp_path / "faces.sbatch")),
                 merge.replace(data, ours)):
        done = subprocess.run(["bash", "-c", line], cwd=paths.REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert contents(tmp_path / "faces") == contents(single)


def test_the_docs_rerun_of_one_task_works_as_written(raw, single, tmp_path):
    """docs/cluster.md's `sbatch --array=K --export=ALL,SHARD=K/N faces.sbatch`, run the way
    SLURM runs it (the variables it sets for an array of one element, and the exported
    SHARD), after task 1 of 3 lost its part; without SHARD it is refused (issue 36, item 2:
    it was taken for shard 0/1 and cropped the whole data set)."""
    page = (paths.REPO_ROOT / "docs" / "cluster.md").read_text()
    script = next(block for block in re.findall(r"```bash\n(.*?)```", page, re.S)
                  if "SBATCH" in block)
    rerun = re.search(r"^sbatch --array=(\d+) --export=ALL,SHARD=(\d+)/(\d+) faces.sbatch",
                      page, re.M)
    assert rerun and rerun[1] == rerun[2], "the rerun line gives the task its own shard"
    data = "DATASET=dfdc RAW_DIR=/shared/dfdc FACES_DIR=/shared/faces/dfdc"
    out = tmp_path / "faces"
    (tmp_path / "faces.sbatch").write_text(script.replace(
        data, f"RAW_DIR={raw} FACES_DIR={out} " + " ".join(WORDS)))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}

    def task(k: int, n: int, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(tmp_path / "faces.sbatch")], cwd=paths.REPO_ROOT,
                              env={**base, **extra}, capture_output=True, text=True,
                              timeout=600)

    for k in range(3):  # the job as submitted: --array=0-2
        done = task(k, 3, SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_COUNT="3",
                    SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="2")
        assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(out / paths.FACES_PARTS / "1-of-3")  # task 1 was killed before it began
    alone = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "1",
             "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "1"}
    refused = task(1, 3, **alone)  # `sbatch --array=1 faces.sbatch`
    assert refused.returncode != 0 and "give SHARD=i/n" in refused.stderr
    assert not (out / paths.FACES_PARTS / "0-of-1").exists()  # nothing cropped
    done = task(1, 3, **alone, SHARD="1/3")  # `sbatch --array=1 --export=ALL,SHARD=1/3 ...`
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_cli("merge", "faces", f"RAW_DIR={raw}", f"FACES_DIR={out}", *WORDS) == 0
    assert contents(out) == contents(single)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the step runs no workers")
def test_the_workers_end_when_the_faces_runner_is_killed(raw, tmp_path):
    """Issue 26, item 8: after SIGKILL of the runner its two workers waited for ever,
    600 MB each."""
    out = tmp_path / "faces"
    process = subprocess.Popen([sys.executable, "-m", "dfutils", "faces", f"RAW_DIR={raw}",
                                f"FACES_DIR={out}", *WORDS], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline and process.poll() is None and len(workers) < 2:
            workers = children(process.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the pool did not start"
    finally:
        process.kill()  # the runner alone, as the out-of-memory killer does
        process.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their parent"


def test_a_part_killed_during_its_first_write_is_started_again(raw, single, tmp_path):
    """A kill while the journal's first version was written leaves only a temporary file:
    the part is this step's own, not a stranger's folder."""
    out = tmp_path / "faces"
    part = out / paths.FACES_PARTS / "0-of-1"
    part.mkdir(parents=True)
    (part / ".journal.jsonl.abcd1234.tmp").write_text('{"params"')
    faces.extract_faces(FacesParams(raw_dir=str(raw), faces_dir=str(out), **PARAMS), workers=1)
    assert contents(out) == contents(single)


def test_a_task_uses_the_cores_it_is_given_not_the_machines():
    """SLURM's --cpus-per-task (a CPU affinity) bounds the workers, not os.cpu_count()."""
    done = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0}); "
                           "from dfutils.processes import usable_cpus; print(usable_cpus())"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "1", done.stderr


@pytest.mark.parametrize("damage,words", [
    (lambda part, crop, journal: crop.write_bytes(os.urandom(64)),
     "was changed after it was written"),
    (lambda part, crop, journal: crop.unlink(), "is missing from its part"),
    (lambda part, crop, journal: journal.write_text(journal.read_text().replace(
        '"label": "real"', '"label": "fake"', 1)), "of its journal was changed after"),
    (lambda part, crop, journal: journal.write_text("not a journal\n"),
     "line 1 of its journal is damaged")])
def test_a_merge_takes_no_part_changed_after_it_was_written(raw, tmp_path, capsys, damage,
                                                           words):
    """Issue 36, item 13: a crop overwritten with random bytes, or a journal row relabelled,
    merged as is; a corrupt journal was reported as missing; a deleted crop gave a raw
    [Errno 2]. The merge names the shard to run again, and changes nothing."""
    out = tmp_path / "faces"
    shard_all(raw, out, 2)
    part = out / paths.FACES_PARTS / "1-of-2"
    crop = next(p for p in sorted(part.rglob("*.png")) if "/real/" in p.as_posix())
    damage(part, crop, part / "journal.jsonl")
    before = contents(out)
    assert run_cli("merge", "faces", f"RAW_DIR={raw}", f"FACES_DIR={out}", *WORDS) == 2
    error = one_line_error(capsys.readouterr().err)
    assert "shard 1/2" in error and words in error and "SHARD=1/2" in error
    assert "shard 0/2" not in error and contents(out) == before


def test_a_predict_part_edited_after_it_was_written_is_named(raw, face_run, tmp_path, capsys):
    """Issue 36, item 13: a predict part's edited row was merged as is."""
    out = tmp_path / "p.csv"
    for k in range(2):
        assert run_cli("predict", "--run", str(face_run), str(raw), "--out", str(out),
                       "--shard", f"{k}/2") == 0
    journal = tmp_path / "p.csv.parts" / "0-of-2" / "journal.jsonl"
    journal.write_text(journal.read_text().replace('"status": "ok"', '"status": "OK"', 1))
    capsys.readouterr()
    assert run_cli("merge", "predict", "--out", str(out)) == 2
    assert "shard 0/2: line" in one_line_error(capsys.readouterr().err) and not out.exists()


def test_merge_evaluate_takes_a_plain_name_only(face_run, tmp_path, capsys):
    """Issue 36, item 13: `merge evaluate --name ../../x` escaped to runs/x."""
    assert run_cli("merge", "evaluate", "--run", str(face_run), "--name", "../../x") == 2
    assert "must be a plain name" in one_line_error(capsys.readouterr().err)
