"""JupyterLab and git: the project's kernel, and what git would commit of a notebook.

`make setup` registers the kernel and installs nbstripout's git filter; `make lab` runs
`refresh_git_stat` after every save; `make check-notebooks` asks `commit_problems`.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat

# The kernel the notebooks name: `make setup` registers it (`python -m dfutils install-kernel`).
KERNEL = {"name": "dfutils", "display_name": "Python (dfutils)", "language": "python"}


def install_kernel() -> str:
    """Register this interpreter as the notebooks' kernel, inside its environment."""
    from ipykernel.kernelspec import install

    return install(kernel_name=KERNEL["name"], display_name=KERNEL["display_name"],
                   prefix=sys.prefix)


# Every path handed to git is a file's name, never a pattern: `nb[ab].ipynb` names that
# notebook alone, not nba.ipynb and nbb.ipynb.
_LITERAL = {**os.environ, "GIT_LITERAL_PATHSPECS": "1"}


def _git(where: Path, *args: str) -> subprocess.CompletedProcess:
    """git run in folder `where`, paths taken literally; output as bytes."""
    return subprocess.run(["git", *args], cwd=where, capture_output=True, env=_LITERAL)


def staged_text(path: Path, as_path: Path | None = None) -> tuple[bytes, str]:
    """What `git add` would stage for a file (as if it were at `as_path`): its content
    through the clean filter its git attributes name (nbstripout, which `make setup`
    installs), run as git runs it; or the content as it is, when no filter applies. With a
    word on which it was."""
    content = path.read_bytes()
    where = as_path or path
    top = _git(where.parent, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return content, "not in a git work tree: the file as it is"
    root = top.stdout.decode().strip()
    attribute = _git(where.parent, "check-attr", "filter", "--", where.name).stdout.decode()
    name = attribute.rpartition(": ")[2].strip()
    if name in ("", "unspecified", "unset"):
        return content, "no git filter applies: the file as it is"
    clean = _git(where.parent, "config", "--get", f"filter.{name}.clean").stdout.decode().strip()
    if not clean:
        return content, (f"git filter {name!r} is not installed (run `make setup`): the file "
                         "as it is")
    try:
        relative = where.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise RuntimeError(f"it leads outside the repository {root} (a link?), where git does "
                           "not track it") from None
    filtered = subprocess.run(clean.replace("%f", shlex.quote(relative)), shell=True,
                              cwd=root, input=content, capture_output=True)
    if filtered.returncode != 0:
        said = filtered.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"git filter {name!r} failed ({said[-1] if said else 'no message'}): "
                           "run `make setup` in this checkout to install it again")
    return filtered.stdout, f"through git filter {name!r}"


_SAID: set[str] = set()  # what the hook could not do, said once each in the server's log


def refresh_git_stat(os_path: str, contents_manager: Any = None, **_: Any) -> bool:
    """`make lab`'s post-save hook. A notebook saved with outputs differs on disk from what
    git stores, and `git status` lists every file whose size changed, even when the filter
    would stage nothing new. When what `git add` would stage of the saved notebook is
    exactly what is staged already, stage it (the same content: only git's record of the
    file's size and time changes), so `git status` shows no change; any other change is
    left for the user. True when it refreshed.

    It never makes a save fail: when it cannot work (a notebook linked from outside the
    repository, a filter whose program moved), the save stands, and the server's log says
    why, once."""
    try:
        return _refresh(Path(os_path))
    except Exception as error:  # a save hook that raises fails the user's save (HTTP 500)
        why = f"dfutils post-save hook: git status not refreshed for {os_path}: {error}"
        if why not in _SAID:
            _SAID.add(why)
            log = getattr(contents_manager, "log", None) or logging.getLogger("dfutils")
            log.warning(why)
        return False


def _refresh(path: Path) -> bool:
    text, how = staged_text(path) if path.suffix == ".ipynb" else (b"", "")
    if not how.startswith("through git filter"):
        return False
    folder, name = path.parent, path.name
    entry = _git(folder, "ls-files", "--stage", "--", name).stdout.decode().split()
    index = _git(folder, "show", f":./{name}")
    if not entry or index.returncode != 0 or index.stdout != text:
        return False
    _git(folder, "add", "--", name)
    if _git(folder, "ls-files", "--stage", "--", name).stdout.decode().split()[:2] != entry[:2]:
        # saved again meanwhile with other content: put the entry back as it was
        _git(folder, "update-index", "--cacheinfo", f"{entry[0]},{entry[1]},{entry[3]}")
        return False
    return True


def commit_problems(path: Path) -> list[str]:
    """What a commit of this notebook would carry that it must not: outputs or execution
    counts (in what `git add` would stage, and in what is staged now), or, in what `git add`
    would stage, another kernel than the project's."""
    problems = []
    try:
        text, how = staged_text(path)
    except (RuntimeError, OSError) as error:
        return [f"{path}: cannot tell what git would commit: {error}"]
    versions = [(text, f"as git would stage it ({how})")]
    index = _git(path.parent, "show", f":./{path.name}")
    if index.returncode == 0:
        versions.append((index.stdout, "as staged now"))
    for content, where in versions:
        nb = nbformat.reads(content.decode("utf-8"), as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        if dirty:
            problems.append(f"{path}: {where}, cells {dirty} carry outputs or execution counts "
                            "(`make setup` installs the filter that strips them on `git add`; "
                            "or run `.venv/bin/nbstripout` on the file)")
        kernel = nb.metadata.get("kernelspec", {}).get("name")
        if content is text and kernel != KERNEL["name"]:
            problems.append(f"{path}: {where}, its kernel is {kernel!r}, not the project's "
                            f"{KERNEL['name']!r} ({KERNEL['display_name']}): choose that kernel "
                            "in JupyterLab and save")
    return problems
