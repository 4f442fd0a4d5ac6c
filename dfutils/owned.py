"""A step that owns an output folder (the split, the faces step, the demo builder): the one
mechanism by which it writes there.

`OwnedFolder` reuses a result made from the same inputs and parameters (`fingerprint`),
refuses one made otherwise unless asked to overwrite, refuses anything in the way that the
step did not write (before a single file changes), builds the new result in a folder
beside the old one and swaps it in, so an interrupted step leaves the old result or the
new one, never a mixture and never a user's file lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


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



def complete_report(folder: Path, report: str, last: str) -> dict | None:
    """The JSON `report` in `folder` of a complete result (its `last` entry is there too,
    and the report holds the step's "params" and its inputs' "fingerprint"), or None."""
    if not all((folder / name).is_file() for name in (report, last)):
        return None
    try:
        found = json.loads((folder / report).read_text())
    except (ValueError, OSError):
        return None
    return found if isinstance(found, dict) and {"params", "fingerprint"} <= set(found) else None


_OWNERS: list[OwnedFolder] = []  # every step's OwnedFolder, so each can tell the others'

# Build folders carry this marker, so a later run removes its own leftovers of a killed
# run, and nothing else.
_PARTIAL = ".dfutils-partial"


@dataclass(frozen=True)
class OwnedFolder:
    """What a step owns inside its output folder, and how it replaces it."""

    step: str  # who writes it, for messages: "the split"
    result: str  # what it is, for messages: "a split"
    option: str  # the parameter that names the folder: "data_dir"
    entries: tuple[str, ...]  # what it owns there; the last is written last: its presence
    # (with `report`) says the result is complete
    folders: tuple[str, ...]  # of those, the folders: they may hold only files it listed
    report: str  # a JSON file with at least the step's "params" and its inputs' "fingerprint"
    listed: Callable[[Path, dict], set[str]]  # (folder, report) -> paths it wrote there
    prefix: str  # build folders are .<prefix>-tmp-*, old results on their way out .<prefix>-old-*
    error: type[Exception] = ValueError

    def __post_init__(self) -> None:
        _OWNERS.append(self)

    def read_report(self, folder: Path) -> dict | None:
        """The report of a complete result in `folder`, or None."""
        return complete_report(folder, self.report, self.entries[-1])

    def current(self, folder: Path, params: dict, fingerprint: str, overwrite: bool
                ) -> dict | None:
        """Every check before anything changes. The report on disk when it is already the
        answer (same parameters, same inputs); otherwise None once it is safe to build:
        a result made with other parameters is refused unless `overwrite`, and anything in
        the way that the step did not write is refused whatever `overwrite` says."""
        for other in _OWNERS:  # both may write one name (faces.csv): one folder, one step
            if other.step != self.step and (folder / other.report).is_file():
                raise self.error(
                    f"{folder} holds {other.result} ({other.report}, written by {other.step}): "
                    f"{self.step} needs a folder of its own; choose another {self.option}")
        report = self.read_report(folder)
        if report is not None:
            if report["params"] == params and report.get("fingerprint") == fingerprint:
                return report
            if report["params"] != params and not overwrite:
                raise self.error(
                    f"{folder} already holds {self.result} made with {report['params']}; this "
                    f"one asks for {params}. Pass overwrite=True (OVERWRITE=1 with make) to "
                    f"replace it, or choose another {self.option}")
        self._check_replaceable(folder, report)
        return None

    def _check_replaceable(self, folder: Path, report: dict | None) -> None:
        present = [name for name in self.entries if os.path.lexists(folder / name)]
        if not present:
            return
        advice = (f"move it out of {folder} or choose another {self.option}: {self.step} "
                  "replaces only files it wrote")
        if report is None:
            raise self.error(f"{folder / present[0]} is in the way and was not written by "
                             f"{self.step} (there is no complete {self.report} of one): "
                             f"{advice}")
        intruder = _first_unlisted(folder, self.folders, self.listed(folder, report))
        if intruder is not None:
            raise self.error(f"{intruder} was not written by {self.step} (its {self.report} "
                             f"does not list it): {advice}")

    @contextlib.contextmanager
    def build(self, folder: Path) -> Iterator[Path]:
        """A new, empty build folder inside `folder`; when the block ends, its entries
        replace the result's. On any error or Ctrl-C it is dropped and the old result stays.
        Leftovers of a killed build are removed first."""
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f".{self.prefix}-*"):
            if leftover.is_dir() and not leftover.is_symlink() and (
                    leftover / _PARTIAL).is_file():
                shutil.rmtree(leftover)
        built = self._new_partial(folder, "tmp")
        try:
            yield built
        except BaseException:
            shutil.rmtree(built, ignore_errors=True)
            raise
        # The last entry goes out first and comes in last: until it is back, the result
        # does not look complete.
        old = self._new_partial(folder, "old")
        for name in reversed(self.entries):
            if os.path.lexists(folder / name):
                os.replace(folder / name, old / name)
        for name in self.entries:
            if os.path.lexists(built / name):
                os.replace(built / name, folder / name)
        shutil.rmtree(old)
        shutil.rmtree(built)

    def _new_partial(self, folder: Path, kind: str) -> Path:
        made = Path(tempfile.mkdtemp(prefix=f".{self.prefix}-{kind}-", dir=folder))
        (made / _PARTIAL).touch()
        return made


def _first_unlisted(folder: Path, subfolders: tuple[str, ...], listed: set[str]
                    ) -> Path | None:
    """The first thing under folder/<subfolder> that a step did not write: a file not in
    `listed` (paths relative to `folder`), or a subfolder entry that is not a real folder."""
    for name in subfolders:
        top = folder / name
        if not os.path.lexists(top):
            continue
        if top.is_symlink() or not top.is_dir():
            return top
        for path in sorted(top.rglob("*")):
            if (path.is_symlink() or not path.is_dir()) and (
                    path.relative_to(folder).as_posix() not in listed):
                return path
    return None
