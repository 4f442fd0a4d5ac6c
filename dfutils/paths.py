"""Where things are: the repository root, path resolution, atomic writes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# dfutils is installed editable (`make setup`), so the package sits in the repository.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Read once at import: the permissions atomic_path gives a new file (os.umask can only be
# read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
# A name that becomes one folder (a run, a report): no separators, no leading dot.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The temporary files atomic_path makes: `.<name>.<8 random characters>.tmp`. A kill
# (SIGKILL, power loss) can leave one behind; `remove_stale_temps` clears them.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def resolve(path: str | os.PathLike) -> Path:
    """A path from a parameter: absolute as given, relative to the repository root otherwise.

    JupyterLab (cwd notebooks/), papermill and pytest then agree on every path.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def is_plain_name(name: str) -> bool:
    """Whether `name` can be one folder's name: letters, digits, '.', '_', '-', no leading dot."""
    return bool(_PLAIN_NAME.match(name))


def display_path(path: str | os.PathLike) -> str:
    """A path as text that any UTF-8 writer accepts: bytes that are not UTF-8 (Linux allows
    them in names) are shown as backslash escapes such as \\xe9."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_problem(path: str | os.PathLike) -> str:
    """Why `path` cannot be read as a regular file, or "" when it can be.

    Opening a FIFO would block for ever and a device may never end, so they are named and
    left alone instead of read.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken symbolic link" if path.is_symlink() else "does not exist"
    except OSError as error:
        return f"cannot be examined: {error.strerror or error}"
    kinds = ((stat.S_ISREG, ""), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    kind = next((k for test, k in kinds if test(mode)), "of an unknown kind")
    return kind and f"not a regular file: {kind}"


def fingerprint(root: Path, paths: Iterable[str]) -> str:
    """A cheap identity of files below `root` (names, sizes, modification times): a step
    whose inputs and parameters are unchanged need not run again."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        try:
            stat = (root / rel).stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # a broken link, or a name shown with escapes: its name alone
            digest.update(f"{rel}\n".encode())
    return digest.hexdigest()


def tree(folder: Path, seen: set[tuple[int, int]] | None = None
         ) -> Iterator[tuple[Path, str]]:
    """Every file below `folder`, depth first in sorted order (the order of
    sorted(folder.rglob("*"))), as (path, ""). Links to folders are followed, each real
    folder once: a link back to a folder already walked (a loop, or the same folder twice)
    comes out as (link, why it was not followed), so a loop ends and nothing is silent."""
    seen = seen if seen is not None else set()
    info = folder.stat()
    seen.add((info.st_dev, info.st_ino))
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        yield folder, f"the folder cannot be read ({error.strerror}): check its permissions"
        return
    for path in entries:
        if not path.is_dir():
            yield path, ""
            continue
        info = path.stat()
        if (info.st_dev, info.st_ino) in seen:
            yield path, (f"a link to {os.path.realpath(path)}, a folder already read (a "
                         "loop, or the same folder twice): not followed")
            continue
        yield from tree(path, seen)


def walk_files(root: Path, folder: Path, suffixes: set[str], kinds: str
               ) -> Iterator[tuple[Path, str, str]]:
    """Every file below `folder`, sorted, as (path relative to `root`, that path as text,
    why it is skipped or ""): not a regular file, a name that is not UTF-8, or a suffix
    (any letter case) outside `suffixes`, which `kinds` names for the user. Links to
    folders are followed (`tree`)."""
    for path, loop in tree(folder):
        rel = path.relative_to(root)
        if loop:
            yield rel, display_path(rel), loop
            continue
        shown, problem = display_path(rel), file_problem(path)
        if not problem and shown != rel.as_posix():
            problem = ("the file name is not valid UTF-8 (reports and manifests are UTF-8 "
                       "text): rename the file")
        if not problem and path.suffix.lower() not in suffixes:
            problem = f"unsupported file type {path.suffix or '(no extension)'!r}; use {kinds}"
        yield rel, shown, problem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it becomes `path` in one step.

    A crash or Ctrl-C mid-write leaves the old file (or none), never half a file. With
    `replace=False` an existing `path` is never overwritten: FileExistsError instead
    (a hard link, unlike a rename, refuses an existing target atomically).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp(path: Path) -> bool:
    """Whether `path` is a temporary file of `atomic_path`."""
    return bool(_TEMP.match(path.name)) and path.is_file()


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left under `folder`."""
    folder = Path(folder)
    stale = [p for p in folder.rglob(".*.tmp") if is_temp(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def jsonable(value: object) -> object:
    """`value` with NumPy scalars made plain and NaN/inf made None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str] | None = None) -> None:
    """Write dicts as UTF-8 CSV with a header, atomically.

    A file name that is not valid UTF-8 is written back as the bytes it has on disk
    (surrogateescape), so reading the CSV with the same error handler gives the path exactly.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                        errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else []))
        writer.writeheader()
        writer.writerows(rows)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
