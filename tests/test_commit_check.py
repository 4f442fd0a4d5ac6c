"""`make check-notebooks` checks what a commit would carry, not the working file: outputs a
JupyterLab save leaves in the file pass while the nbstripout filter is installed, and fail
when a commit would really carry them (no filter, or already staged)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dfutils import jupyter
from dfutils.paths import REPO_ROOT


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository holding one of our notebooks, committed clean, with the filter as
    `make setup` installs it."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "notebooks" / "01-split.ipynb", repo / "notebooks")
    (repo / ".gitattributes").write_text("*.ipynb filter=nbstripout\n")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.org")
    git(repo, "config", "user.name", "test")
    install_filter(repo)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "clean")
    return repo


def install_filter(repo: Path) -> None:
    git(repo, "config", "filter.nbstripout.clean", f'"{sys.executable}" -m nbstripout')
    git(repo, "config", "filter.nbstripout.smudge", "cat")
    git(repo, "config", "filter.nbstripout.extrakeys", "metadata.language_info")


def save_as_jupyterlab_does(path: Path) -> None:
    """Outputs, execution counts and kernel details in the working file."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    code[0]["execution_count"] = 1
    code[0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.2",
                                       "mimetype": "text/x-python"}
    path.write_text(json.dumps(nb, indent=1))


def status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout


def test_outputs_saved_in_the_working_file_do_not_fail_the_check(repo):
    notebook = repo / "notebooks" / "01-split.ipynb"
    save_as_jupyterlab_does(notebook)
    assert jupyter.commit_problems(notebook) == []
    assert jupyter.staged_text(notebook)[0] == (REPO_ROOT / "notebooks" /
                                                 "01-split.ipynb").read_bytes()
    # git lists the file (its size changed) until make lab's post-save hook records it
    assert status(repo) == " M notebooks/01-split.ipynb\n"
    assert jupyter.refresh_git_stat(os_path=str(notebook))
    assert status(repo) == ""
    assert b'"output_type"' in notebook.read_bytes()  # the outputs stay in the file


def test_the_post_save_hook_never_stages_a_real_change(repo):
    notebook = repo / "notebooks" / "01-split.ipynb"
    save_as_jupyterlab_does(notebook)
    nb = json.loads(notebook.read_text())
    nb["cells"][0]["source"] = ["# a researcher's edit\n"]
    notebook.write_text(json.dumps(nb, indent=1))
    assert not jupyter.refresh_git_stat(os_path=str(notebook))
    assert status(repo) == " M notebooks/01-split.ipynb\n"  # not staged: theirs to decide


def test_outputs_fail_when_a_commit_would_carry_them(repo):
    notebook = repo / "notebooks" / "01-split.ipynb"
    save_as_jupyterlab_does(notebook)
    git(repo, "config", "--unset", "filter.nbstripout.clean")  # no filter: the file as it is
    problems = jupyter.commit_problems(notebook)
    assert len(problems) == 1 and "carry outputs or execution counts" in problems[0]
    assert "not installed (run `make setup`)" in problems[0]
    git(repo, "add", "notebooks")  # staged without the filter ...
    install_filter(repo)  # ... which a later `make setup` does not undo
    problems = jupyter.commit_problems(notebook)
    assert len(problems) == 1 and problems[0].startswith(f"{notebook}: as staged now")


def test_a_notebook_must_name_the_projects_kernel(repo):
    notebook = repo / "notebooks" / "01-split.ipynb"
    nb = json.loads(notebook.read_text())
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}
    notebook.write_text(json.dumps(nb, indent=1))
    (problem,) = jupyter.commit_problems(notebook)
    assert "its kernel is 'python3', not the project's 'dfutils'" in problem


def test_the_tracked_notebooks_pass_the_check():
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        assert jupyter.commit_problems(path) == []


def test_the_hook_hands_git_literal_names_only(repo):
    """Issue 26, item 1: `nb[ab].ipynb` as a pathspec also staged nba.ipynb's unstaged edit
    and added the untracked nbb.ipynb."""
    notebooks = repo / "notebooks"
    source = notebooks / "01-split.ipynb"
    for name in ("nb[ab].ipynb", "nba.ipynb"):
        shutil.copy(source, notebooks / name)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "two more")
    shutil.copy(source, notebooks / "nbb.ipynb")  # untracked
    edited = json.loads((notebooks / "nba.ipynb").read_text())
    edited["cells"][0]["source"] = ["# a researcher's edit, not staged\n"]
    (notebooks / "nba.ipynb").write_text(json.dumps(edited, indent=1))
    save_as_jupyterlab_does(notebooks / "nb[ab].ipynb")
    assert jupyter.refresh_git_stat(os_path=str(notebooks / "nb[ab].ipynb"))
    assert status(repo) == " M notebooks/nba.ipynb\n?? notebooks/nbb.ipynb\n"


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, line):
        self.lines.append(line)


def test_the_hook_never_fails_a_save_and_says_why_once(repo, tmp_path, capsys):
    """Issue 26, item 1: a notebook linked from outside the repository, or a filter whose
    program is gone, made every save fail (HTTP 500); check-notebooks gave a traceback."""
    from dfutils.__main__ import main

    outside = tmp_path / "elsewhere.ipynb"
    shutil.copy(repo / "notebooks" / "01-split.ipynb", outside)
    (repo / "notebooks" / "linked.ipynb").symlink_to(outside)
    manager = type("ContentsManager", (), {"log": Log()})()
    for _ in range(2):
        assert not jupyter.refresh_git_stat(str(repo / "notebooks" / "linked.ipynb"),
                                            contents_manager=manager)
    assert len(manager.log.lines) == 1 and "leads outside the repository" in (
        manager.log.lines[0])

    notebook = repo / "notebooks" / "01-split.ipynb"
    save_as_jupyterlab_does(notebook)
    git(repo, "config", "filter.nbstripout.clean", f"{tmp_path / 'moved' / 'python'} -m x")
    assert not jupyter.refresh_git_stat(str(notebook), contents_manager=manager)
    assert "git filter 'nbstripout' failed" in manager.log.lines[-1]
    assert main(["check-notebooks", str(notebook)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot tell what git would commit" in err
    assert "run `make setup`" in err


def test_a_notebook_saved_in_jupyterlab_is_read_as_git_commits_it(repo):
    """Issue 26, item 14: the browser tests copied the working file, which a JupyterLab
    save fills with outputs and language_info (hidden from git by the filter); they read
    each notebook as git would commit it."""
    from test_browser import as_committed

    notebook = repo / "notebooks" / "01-split.ipynb"
    save_as_jupyterlab_does(notebook)
    committed = json.loads(as_committed(notebook))
    assert "language_info" not in committed["metadata"]
    assert all(not c.get("outputs") for c in committed["cells"] if c["cell_type"] == "code")
    assert committed == json.loads(as_committed(REPO_ROOT / "notebooks" / "01-split.ipynb"))
