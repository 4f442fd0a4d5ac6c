"""Work split over the tasks of a cluster job: which task owns which input, and where a
task's partial output lives until `merge` joins them.

A shard is "i/n" (task i of n, counted from 0). Its inputs are those whose key hashes to i
modulo n: the same content-free idea as the split's ranking, so the partition depends on
nothing but each input's own key and n. Adding a file moves no other file to another
shard, and every task computes the same partition without talking to the others.

`shard` takes "" (the whole job, one task), "i/n" (given by hand, which always wins), or
"auto": read from the scheduler's environment, in this order:
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (a job array of consecutive indices: one task
per array element; the index counts from SLURM_ARRAY_TASK_MIN), then SLURM_PROCID /
SLURM_NTASKS (the tasks of one `srun`), then RANK / WORLD_SIZE (torchrun). The first that
is set is used; a job array runs each element with SLURM_PROCID 0 of 1, so the array must
come first, and an array element that cannot say which task of how many it is (an array
with a step, or one element submitted again) is refused rather than taken for 0 of 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from dfutils.atomic import atomic_path, is_temp, remove_stale_temps, write_json

# The scheduler variables read by shard="auto", in the order they are tried:
# (index, count, the index's first value or None).
ENVIRONMENT = (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"),
               ("SLURM_PROCID", "SLURM_NTASKS", None),
               ("RANK", "WORLD_SIZE", None))


class ShardError(ValueError):
    """A shard cannot be read, or shards cannot be merged; the message says why."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """The shard's partial output is named by this: 3-of-64."""
        return f"{self.index}-of-{self.count}"

    def owns(self, key: str) -> bool:
        return owner(key, self.count) == self.index


WHOLE = Shard(0, 1)  # the whole job is the one shard of one


def owner(key: str, count: int) -> int:
    """The shard (0 .. count-1) that owns the input called `key`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8],
                          "big") % count


def parse(text: str, what: str = "SHARD") -> Shard:
    """"i/n" as a Shard; ShardError naming `what` unless 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ShardError(f"{what}={text!r}: give i/n with 0 <= i < n (task i of n, counted "
                         "from 0), e.g. 3/64; or auto to read the scheduler's environment")
    return Shard(int(match[1]), int(match[2]))


def from_environment(environ: Mapping[str, str] | None = None) -> Shard:
    """The shard the scheduler's environment gives (the module's docstring has the order);
    ShardError when it cannot say which task of how many this is (`_array`)."""
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" in environ:
        return _array(environ)
    for index, count, _ in ENVIRONMENT[1:]:
        if index in environ and count in environ:
            try:
                return parse(f"{int(environ[index])}/{int(environ[count])}",
                             f"{index}/{count}")
            except ValueError:
                raise ShardError(f"{index}={environ[index]!r} with {count}="
                                 f"{environ[count]!r} is not a task of a job") from None
    names = ", ".join(f"{i} and {c}" for i, c, _ in ENVIRONMENT)
    raise ShardError(f"SHARD=auto found no scheduler's variables ({names}): run it as a task "
                     "of a job array, srun or torchrun, or give SHARD=i/n")


def _array(environ: Mapping[str, str]) -> Shard:
    """A SLURM array element's shard: its index from the array's first, of the array's
    count. Only an array of consecutive indices maps (--array=0-63, or 1-64): an array with
    a step, a list, or one element submitted again (--array=17: SLURM then says 17 of an
    array of 1) cannot tell which task of how many it is, and is refused."""
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP")
    said = " ".join(f"{n}={environ[n]}" for n in names if n in environ)
    fix = "give SHARD=i/n, task i of the job's n (docs/cluster.md: running one task again)"
    try:
        index, first, last, step = (int(environ[n]) if n in environ else None
                                    for n in (names[0], *names[2:]))
        count = int(environ[names[1]]) if names[1] in environ else None
    except ValueError:
        raise ShardError(f"SHARD=auto: {said} is not a task of a job array: {fix}") from None
    if count is None:
        raise ShardError(f"SHARD=auto: {said} without SLURM_ARRAY_TASK_COUNT does not say "
                         f"how many tasks the job has: {fix}")
    first = 0 if first is None else first
    if step not in (None, 1) or (last is not None and last - first + 1 != count):
        raise ShardError(f"SHARD=auto: {said} is an array with a step or gaps, whose tasks "
                         f"do not map to shards 0..n-1: {fix}")
    if count == 1 and index != 0:
        raise ShardError(f"SHARD=auto: {said} is one element of an array submitted on its own "
                         f"(a task run again), which does not say how many tasks the job has: "
                         f"{fix}")
    return parse(f"{index - first}/{count}", "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")


def resolve(text: str, environ: Mapping[str, str] | None = None, what: str = "SHARD"
            ) -> Shard | None:
    """The `shard` parameter as a Shard; None for the whole job ("")."""
    if not text.strip():
        return None
    if text.strip() == "auto":
        return from_environment(environ)
    return parse(text, what)


def job_size(folder: Path, suffix: str, how: str) -> int:
    """The n of the job whose parts (<i>-of-<n><suffix>) are in `folder`; ShardError when
    there are none (`how` says what to run) or parts of jobs of several sizes."""
    name = re.compile(r"(\d+)-of-(\d+)" + re.escape(suffix))
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    counts = sorted({int(m[2]) for p in found if (m := name.fullmatch(p.name))})
    if not counts:
        raise ShardError(f"{folder} holds no shards to merge: {how} (docs/cluster.md)")
    if len(counts) > 1:
        raise ShardError(f"{folder} holds shards of jobs of {' and '.join(map(str, counts))} "
                         "tasks: delete the parts of the job you do not want, then merge")
    return counts[0]


def differing(first: dict, other: dict) -> list[str]:
    """The keys whose values differ between two records, sorted."""
    return sorted(k for k in {*first, *other} if first.get(k) != other.get(k))


class Part:
    """One task's partial output, <parts>/<i>-of-<n>/, until `merge` joins the job's: a
    journal (a header line with what every task of the job must agree on, then one line
    per finished item, written after that item's files), done.json once every item of the
    task is in the journal, and whatever files the task writes beside them (the faces
    step's crops). The faces step, predict and evaluate keep their parts so.

    A journal line that a kill cut short is dropped; a part whose header differs (other
    parameters, other inputs) is another job's and starts afresh: it is the step's own
    scratch, never a result. Each line carries a checksum of itself and the SHA-256 of the
    files its item wrote, so a merge takes no line that was changed and no file that was
    changed or lost after it was written: it names the shard to run again.
    """

    JOURNAL, DONE = "journal.jsonl", "done.json"

    def __init__(self, parts: Path, shard: Shard, header: dict):
        self.shard, self.folder = shard, parts / shard.name
        self.header = {**header, "shard": str(shard)}

    def _read(self) -> tuple[list[dict], str]:
        """The journal's lines as they were written, and why the reading stopped before its
        end ("" when it did not): a line that is damaged or was changed since. A last line
        without its newline is one a kill cut short: dropped, its item is done again."""
        try:
            text = (self.folder / self.JOURNAL).read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], ""
        except (OSError, UnicodeDecodeError) as error:
            return [], f"its journal cannot be read ({error})"
        lines = []
        for number, piece in enumerate(text.split("\n")[:-1], 1):
            try:
                line = json.loads(piece)
            except ValueError:
                return lines, f"line {number} of its journal is damaged"
            check = line.pop("check", None) if isinstance(line, dict) else None
            if check != _digest(line):
                return lines, f"line {number} of its journal was changed after it was written"
            lines.append(line)
        return lines, ""

    def lines(self) -> list[dict]:
        """The journal's lines up to the first one cut, damaged or changed; [] when there
        is none."""
        return self._read()[0]

    def check(self, what: str) -> None:
        """Refuse, before anything is written, a parts folder that the step did not make
        (`what` says where to go instead)."""
        for folder in (self.folder.parent, self.folder):
            if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
                raise ShardError(f"{folder} is in the way and was not written by this step: "
                                 f"move it, or {what}")
        if self.folder.is_dir() and any(not is_temp(p) for p in self.folder.iterdir()) and (
                not self.lines()):  # (a temporary file alone: a kill during the first write)
            raise ShardError(f"{self.folder} holds files but no journal of this step: it is "
                             f"not a part this job wrote; move it, or {what}")

    def problem(self, again: str, expected: dict | None = None, than: str = "") -> str | None:
        """Why this part cannot be merged, in words with the fix (`again`: the option that
        runs it, "SHARD=" or "--shard "); None when it can. Its header must be `expected`
        (made with these parameters from these inputs: those of the merge, or `than` another
        part's), when given."""
        (lines, damaged), rerun = self._read(), f"run it again ({again}{self.shard})"
        if not lines:
            return (f"shard {self.shard}: {damaged}: {rerun}" if damaged else
                    f"shard {self.shard} is missing: {rerun}")
        head = lines[0]
        for key, what in (("params", "parameters"), ("inputs", "inputs")):  # params first
            if expected is None or head.get(key) == expected.get(key):
                continue
            if key == "inputs":
                return (f"shard {self.shard} was made from other inputs (files were added, "
                        f"removed or changed since, or another model): {rerun}")
            changed = ", ".join(differing(expected.get(key) or {}, head.get(key) or {}))
            return f"shard {self.shard} was made with other {what}{than} ({changed}): {rerun}"
        if not (self.folder / self.DONE).is_file():
            return (f"shard {self.shard} is not complete (it was stopped, failed or is still "
                    f"running): {rerun}; it resumes where it stopped")
        if damaged:
            return f"shard {self.shard}: {damaged}: {rerun}"
        for line in lines[1:]:
            for name, digest in (line.get("files") or {}).items():
                path = self.folder / name
                if not path.is_file():
                    return f"shard {self.shard}: {name} is missing from its part: {rerun}"
                if _file_digest(path) != digest:
                    return (f"shard {self.shard}: {name} was changed after it was written: "
                            f"{rerun}")
        return None

    def done(self) -> dict[str, dict]:
        """The finished items of a part of this job (its header is ours): key -> line."""
        lines = self.lines()
        if not lines or lines[0] != self.header:
            return {}
        return {line["key"]: line for line in lines[1:]}

    def start(self, resume: bool = True) -> dict[str, dict]:
        """Make the part ready to write, keeping (with `resume`) the items a killed run of
        this task finished; those items."""
        finished = self.done() if resume else {}
        if not finished and self.folder.exists():  # another job's part, or a fresh start
            shutil.rmtree(self.folder)
        elif finished:
            remove_stale_temps(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / self.JOURNAL) as tmp:  # without a cut line
            tmp.write_text("".join(_sealed(line) + "\n" for line in
                                   [self.header, *finished.values()]), encoding="utf-8")
        return finished

    @contextlib.contextmanager
    def writing(self) -> Iterator[Callable[..., None]]:
        """add(key, record, files=()): one finished item (and the files it wrote in the
        part, their SHA-256 recorded), on disk when it returns."""
        with open(self.folder / self.JOURNAL, "a", encoding="utf-8") as journal:
            def add(key: str, record: dict, files: Iterable[str] = ()) -> None:
                line = {"key": key, **record}
                if files:
                    line["files"] = {name: _file_digest(self.folder / name) for name in files}
                journal.write(_sealed(line) + "\n")
                journal.flush()
            yield add

    def finish(self, n_items: int) -> None:
        """Every item of the task is in the journal."""
        write_json(self.folder / self.DONE, {**self.header, "n_items": n_items})

    def remove(self) -> None:
        shutil.rmtree(self.folder)
        with contextlib.suppress(OSError):  # the last part out removes the parts folder
            self.folder.parent.rmdir()


def _digest(line: dict) -> str:
    """A journal line's checksum (of its content, in a fixed key order)."""
    return hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:16]


def _sealed(line: dict) -> str:
    """A journal line as written: its content and its checksum."""
    return json.dumps({**line, "check": _digest(line)})


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def complete_parts(parts: Path, again: str, header: dict | None = None) -> list[Part]:
    """Every part of the one job in `parts`, in shard order, once each is there and
    complete and all were made alike (as `header` says, or as the first part was); a
    ShardError naming each that is not, with what to run (`again`), otherwise."""
    n = job_size(parts, "", f"run each task with {again}i/n first")
    found = [Part(parts, Shard(k, n), {}) for k in range(n)]
    first = next((p for p in found if p.lines()), None)
    expected = header or (first.lines()[0] if first else None)
    than = "" if header or first is None else f" than shard {first.shard}"
    problems = [problem for part in found
                if (problem := part.problem(again, expected, than)) is not None]
    if problems:
        raise ShardError(f"cannot merge the shards in {parts}: " + "; ".join(problems))
    for part in found:
        part.header = part.lines()[0]
    return found
