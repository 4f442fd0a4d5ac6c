"""A step is one entry of pipeline.STEPS: its notebook, its parameter class and its entry
agree, and an entry alone gives a step its command, its record in run.json and its place
in the summary."""

import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from dfutils import paths, pipeline
from dfutils.__main__ import build_parser, main
from dfutils.params import Params, param
from dfutils.paths import REPO_ROOT, resolve


def test_the_entries_the_notebooks_and_the_parameter_classes_agree():
    notebooks = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks == sorted(pipeline.STEPS)  # every notebook is a step, every step has one
    commands = [step.command for step in pipeline.STEPS.values()]
    assert len(set(commands)) == len(commands)
    for name, step in pipeline.STEPS.items():
        assert step.params.step == name and (REPO_ROOT / step.notebook).is_file()
        assert step.folder in step.params.names()
        assert not step.asked_by or step.asked_by in (*step.params.names(), *pipeline.FLAGS)
        assert list(inspect.signature(step.run).parameters)[0] == "params"
    parser = build_parser()
    available = parser._subparsers._group_actions[0].choices
    assert set(commands) <= set(available)


@dataclass(frozen=True)
class EchoParams(Params):
    """06-echo: write a message into a run."""

    step: ClassVar[str] = "06-echo"

    run_dir: str = param("runs/notebook", "the run to write into", path=True)
    message: str = param("hello", "what to write")
    times: int = param(1, "how often")


def echo(params: EchoParams) -> dict:
    found = {"message": " ".join([params.message] * params.times)}
    (resolve(params.run_dir) / "echo.json").write_text(json.dumps(found))
    return found


def read_echo(params: EchoParams) -> dict:
    return json.loads((resolve(params.run_dir) / "echo.json").read_text())


@pytest.fixture
def with_echo(monkeypatch):
    """A step added as one entry (and its class and function): what adding a step takes,
    the notebook aside."""
    step = pipeline.Step(EchoParams, echo, record=read_echo, reads="02-train",
                         summary=lambda record: {"echo": record.get("message")},
                         summary_lines=lambda s: [f"echo: {s['echo']}"] if s.get("echo") else [],
                         shown=lambda params, result: [result["message"]])
    monkeypatch.setitem(pipeline.STEPS, "06-echo", step)
    return step


def test_an_entry_alone_gives_a_step_its_command_record_and_summary(with_echo, tmp_path,
                                                                    capsys):
    run = tmp_path / "run"
    assert main(["echo", f"--run-dir={run}", "--message", "hi", "TIMES=2"]) == 0
    assert capsys.readouterr().out.strip() == "hi hi"
    record = json.loads((run / paths.RUN_RECORD).read_text())
    entry = record["steps"]["06-echo"]
    assert entry["status"] == "done" and entry["metrics"] == {"message": "hi hi"}
    assert entry["params"] == {"run_dir": str(run), "message": "hi", "times": 2}
    assert record["summary"]["echo"] == "hi hi"
    assert pipeline.summary_lines(record["summary"]) == ["echo: hi hi"]
    assert main(["echo", f"--run-dir={run}", "--times", "two"]) == 2
    assert "'times' takes an integer" in capsys.readouterr().err


@pytest.mark.parametrize("again,stale", [
    ("02-train", ["03-gradcam", "04-evaluate", "05-benchmark", "06-echo"]),
    ("01-split", ["02-train", "03-gradcam", "04-evaluate", "05-benchmark", "06-echo"]),
    ("03-gradcam", []), ("04-evaluate", [])])
def test_a_step_run_again_makes_the_steps_made_from_it_stale(with_echo, tmp_path, again,
                                                             stale):
    """Retraining makes everything made from the model stale; evaluating again makes
    nothing stale (the benchmark does not read the evaluation)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / paths.RUN_RECORD).write_text(json.dumps({"steps": {
        name: {"status": "done"} for name in pipeline.STEPS}}))
    step = dataclasses.replace(pipeline.STEPS[again], run=lambda params: None,
                               record=lambda params: None)
    given = {"eval_dir": "elsewhere", "run_dir": str(run)}  # what 04-evaluate needs
    with pipeline.recorded(run, step, {k: v for k, v in {**step.params.defaults(),
                                                        **given}.items()
                                       if k in step.params.names()}):
        pass
    steps = json.loads((run / paths.RUN_RECORD).read_text())["steps"]
    assert [name for name, s in steps.items() if s["status"] == "stale"] == stale
    assert all(steps[name]["stale_because"] == f"{again} was run again" for name in stale)


def test_a_failing_command_is_recorded_as_failed(with_echo, tmp_path, monkeypatch, capsys):
    def broken(params):
        raise ValueError("the message cannot be written")

    monkeypatch.setitem(pipeline.STEPS, "06-echo", dataclasses.replace(with_echo, run=broken))
    assert main(["echo", f"--run-dir={tmp_path / 'run'}"]) == 2
    assert "the message cannot be written" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / paths.RUN_RECORD).read_text())
    assert record["steps"]["06-echo"]["status"] == "failed"
