"""Writing a file so that it is whole or absent: a kill (Ctrl-C, SIGKILL, power loss)
mid-write leaves the old file, never half of a new one; JSON and CSV through it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Read once at import: the permissions atomic_path gives a new file (os.umask can only be
# read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
# The temporary files atomic_path makes: `.<name>.<8 random characters>.tmp`. A kill
# (SIGKILL, power loss) can leave one behind; `remove_stale_temps` clears them.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


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
