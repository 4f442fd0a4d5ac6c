"""Every mistake a user can make is one line naming the file or value and the fix, and
command-line values mean what they would mean to any command-line tool."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
from conftest import (
    make_raw,
    one_line_error,
    rows_of,
    write_image,
)

from dfutils import paths, pipeline
from dfutils.__main__ import main
from dfutils.atomic import remove_stale_temps
from dfutils.model import CheckpointError, load_checkpoint, save_checkpoint
from dfutils.params import EvalParams, ParameterError, TrainParams, from_working_dir
from dfutils.paths import REPO_ROOT
from dfutils.pipeline import load_params
from dfutils.runs import environment

# -- mistakes a user can make: one line naming the file or value ----------------------------

@pytest.mark.parametrize("text,expected", [("lr: [1, 2\n", "not valid YAML at line"),
                                           ("- 1\n- 2\n", "must be a mapping"),
                                           ("just words\n", "must be a mapping")])
def test_a_malformed_parameter_file_is_named(tmp_path, text, expected, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(text)
    with pytest.raises(ParameterError, match=expected):
        load_params(TrainParams, str(params), {})
    assert main(["run-all", "--runs-root", str(tmp_path), f"PARAMS={params}"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(params) in line and expected in line


def test_train_with_missing_weights_is_one_line(tmp_path, separable_split, capsys):
    assert main(["train", "--set", f"data_dir={separable_split}", "--set",
                 f"run_dir={tmp_path / 'r'}", "--set", "weights=nowhere.pth", "--set",
                 "num_workers=0"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: weights file") and "nowhere.pth" in line


@pytest.mark.parametrize("change", ["wrong shapes", "no params"])
def test_a_checkpoint_that_is_not_ours_is_one_line(run_dir, tmp_path, change, capsys):
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    if change == "wrong shapes":
        state = {k: v for k, v in checkpoint["model_state"].items()}
        state["fc.weight"] = torch.zeros(2, 512)
        save_checkpoint(run_dir / "model.pt", state, params={**checkpoint["params"], "arch":
                        checkpoint["arch"]}, threshold=0.5, threshold_rule="0.5", metrics={},
                        epoch=1)
    else:
        del checkpoint["params"]
        torch.save(checkpoint, run_dir / "model.pt")
    with pytest.raises(CheckpointError, match="do not fit resnet18|lacks params"):
        load_checkpoint(run_dir / "model.pt")
    write_image(tmp_path / "a.png", seed=1)
    assert main(["predict", "--run", str(run_dir), str(tmp_path / "a.png")]) == 2
    assert str(run_dir / "model.pt") in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("key,value", [("lr", "inf"), ("lr", "nan"), ("min_delta", "nan"),
                                       ("weight_decay", "-inf"), ("jitter", "[0.2, NaN, 0, 0]")])
def test_non_finite_numbers_are_refused_by_name(key, value):
    with pytest.raises(ParameterError, match=key):
        load_params(TrainParams, None, {key: value})


def test_evaluate_with_one_class_unreadable_fails_with_a_message(run_dir, tmp_path,
                                                                 capsys):
    data = make_raw(tmp_path / "labelled", 3, 0)
    (data / "fake").mkdir(exist_ok=True)
    (data / "fake" / "f.png").write_bytes(b"not a png")
    assert main(["evaluate", "--run", str(run_dir), "--data", str(data)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no fake image" in line and "f.png" in line

# -- paths on the command line ---------------------------------------------------------------

def test_command_line_paths_are_relative_to_the_working_directory(run_dir, tmp_path,
                                                                  monkeypatch, capsys):
    make_raw(tmp_path / "labelled", 3, 3)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--run", "run", "labelled/real", "--out", "p.csv"]) == 0
    assert len(rows_of((tmp_path / "p.csv").read_text())) == 3
    assert main(["evaluate", "--run", "run", "--data", "labelled"]) == 0
    assert (run_dir / "eval" / "labelled" / "report.json").is_file()
    assert main(["evaluate", "--run", "run", "--data", "labelled", "--name", "../../x"]) == 2
    assert "plain name" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert from_working_dir({"data_dir": "d", "weights": "imagenet", "lr": "1"}, [TrainParams],
                            "/w") == {"data_dir": "/w/d", "weights": "imagenet", "lr": "1"}
    assert from_working_dir({"weights": "w.pth", "eval_dir": "~/e"}, [TrainParams, EvalParams],
                            "/w")["weights"] == "/w/w.pth"


def test_run_all_reads_raw_dir_from_the_working_directory(tmp_path, notebooks_that,
                                                          monkeypatch):
    make_raw(tmp_path / "raw", 4, 4)
    calls = notebooks_that()
    monkeypatch.chdir(tmp_path)
    assert main(["run-all", "--runs-root", "runs", "RAW_DIR=raw", "DATA_DIR=d",
                 "STEPS=01-split"]) == 0
    assert calls[0][1]["raw_dir"] == str(tmp_path / "raw")
    assert (tmp_path / "runs").is_dir()


def test_make_hands_values_to_the_runner_exactly_as_typed(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    values = ["RUN=a;touch pwned", "RAW_DIR=/data/photos (2024)", "NAME=it's", "X=$HOME",
              'Y=a "b"  c', "Z=$(shell touch pwned)", "W=`touch pwned`"]
    done = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "run-all", f"PY={stub}",
                           f"STAMP={stub}", *values], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:3] == ["-m", "dfutils", "run-all"] and sorted(argv[3:]) == sorted(values)
    assert not (tmp_path / "pwned").exists() and not (REPO_ROOT / "pwned").exists()


@pytest.mark.notebooks
def test_make_split_keeps_its_notebook_beside_the_split(tmp_path):
    raw = make_raw(tmp_path / "raw", 4, 4)
    runs = tmp_path / "runs"
    run = pipeline.run_all(None, None, {"raw_dir": str(raw), "data_dir": str(tmp_path / "d")},
                           steps=["01-split"], replace_run=True, beside_data=True,
                           runs_root=runs)
    assert run == tmp_path / "d" / paths.SPLIT_RUN
    assert (run / "01-split.ipynb").is_file() and (run / "run.json").is_file()
    assert not runs.exists()
    again = pipeline.run_all(None, None, {"raw_dir": str(raw), "data_dir": str(tmp_path / "d")},
                             steps=["01-split"], replace_run=True, beside_data=True)
    assert again == run


def test_run_json_records_the_cpu_instruction_set():
    assert environment()["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()


def test_stale_temporary_files_are_ours_only(tmp_path):
    ours = [tmp_path / ".model.pt.ab12cd34.tmp", tmp_path / "g" / ".curves.png.x_y9z8w7.tmp"]
    theirs = [tmp_path / "notes.tmp", tmp_path / ".model.pt.tmp", tmp_path / "a.ab12cd34.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


@pytest.mark.parametrize("flags", [[], ["-i"]])
def test_a_line_break_in_a_make_value_is_refused_before_anything_runs(tmp_path, flags):
    """Issue 26, item 9: the text after a newline ran as a command under make -i."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nopen({str(tmp_path / 'ran')!r}, 'w')\n")
    stub.chmod(0o755)
    done = subprocess.run(["make", "-s", *flags, "-C", str(REPO_ROOT), "faces", f"PY={stub}",
                           f"STAMP={stub}", "FACES_DIR=x\ntouch pwned #"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0 and not (tmp_path / "ran").exists()
    assert not (tmp_path / "pwned").exists() and not (REPO_ROOT / "pwned").exists()
    assert "FACES_DIR= holds a line break" in one_line_error(done.stderr)


@pytest.mark.parametrize("value", ["a\rb", "x\x1b[2J", "tab\there"])
def test_a_control_character_in_a_value_is_named(value, capsys):
    assert main(["run-all", f"RUN={value}"]) == 2
    assert "RUN= holds a control character" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("word", ["RESUME=on", "RESUME=y", "FACES=", "OVERWRITE="])
def test_a_flag_takes_the_usual_spellings_or_is_refused_by_name(word, capsys):
    """Issue 26, item 12 (already refused by name before this round; kept as a test)."""
    assert main(["run-all", "RUN=x", word]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"{word.split('=')[0]} takes true or false" in error


@pytest.mark.parametrize("status,words", [
    (None, "train a model first"),
    ("running-alive", "02-train is still running there"),
    ("running-dead", "stopped before it kept an epoch (its process is gone"),
    ("failed", "02-train failed (2026-01-01T00:00:00): the error is in its notebook"),
])
def test_a_run_without_model_pt_says_why(tmp_path, status, words, capsys):
    """Issue 26, item 12: "train a model first" even while training ran or after it failed."""
    import os

    from dfutils.runs import write_run

    run = tmp_path / "run"
    run.mkdir()
    if status:
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        pid = os.getpid() if status == "running-alive" else dead.pid
        write_run(run, {"steps": {"02-train": {
            "status": status.split("-")[0], "started": "2026-01-01T00:00:00",
            "finished": "2026-01-01T00:00:00", "pid": pid, "host": platform.node()}}})
    assert main(["predict", "--run", str(run), str(tmp_path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert f"{run / paths.MODEL} not found: " in error and words in error


def test_evaluate_data_inside_the_run_is_refused_by_name(run_dir, capsys):
    """Issue 26, item 12: --data inside the run folder named the run's internal folders."""
    (run_dir / "eval" / "x").mkdir(parents=True)
    assert main(["evaluate", "--run", str(run_dir), "--data", str(run_dir / "eval" / "x")]) == 2
    assert "is inside the run folder" in one_line_error(capsys.readouterr().err)


def test_a_clip_scored_as_an_image_says_what_to_do(run_dir, tmp_path, capsys):
    """Issue 26, item 12: --no-faces on a clip (or a run not trained on faces) said only
    "not an image"."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    write_image(tmp_path / "photo.png", seed=1)
    assert main(["predict", "--run", str(run_dir), str(clip), str(tmp_path / "photo.png"),
                 "--no-faces"]) == 0
    captured = capsys.readouterr()
    rows = rows_of(captured.out)
    assert rows[str(clip)]["status"] == ("error: a video clip: this run was trained on images, "
                                         "not on face crops (FACES=1), and scores images only")
    assert rows[str(tmp_path / "photo.png")]["status"] == "ok"
