"""Work split over the tasks of a cluster job: which task owns which input, and where a
task's partial output lives until `merge` joins them.

A shard is "i/n" (task i of n, counted from 0). Its inputs are those whose key hashes to i
modulo n: the same content-free idea as the split's ranking, so the partition depends on
nothing but each input's own key and n. Adding a file moves no other file to another
shard, and every task computes the same partition without talking to the others.

`shard` takes "" (the whole job, one task), "i/n" (given by hand, which always wins), or
"auto": read from the scheduler's environment, in this order:
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (a job array: one task per array element;
the index counts from SLURM_ARRAY_TASK_MIN), then SLURM_PROCID / SLURM_NTASKS (the tasks
of one `srun`), then RANK / WORLD_SIZE (torchrun). The first pair that is set is used; a
job array runs each element with SLURM_PROCID 0 of 1, so the array must come first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dfutils.paths import write_json

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
    """The shard the scheduler's environment gives (the module's docstring has the order)."""
    environ = os.environ if environ is None else environ
    for index, count, first in ENVIRONMENT:
        if index in environ and count in environ:
            try:
                i = int(environ[index]) - (int(environ[first]) if first and first in environ
                                           else 0)
                return parse(f"{i}/{int(environ[count])}", f"{index}/{count}")
            except ValueError:
                raise ShardError(f"{index}={environ[index]!r} with {count}="
                                 f"{environ[count]!r} is not a task of a job") from None
    names = ", ".join(f"{i} and {c}" for i, c, _ in ENVIRONMENT)
    raise ShardError(f"SHARD=auto found no scheduler's variables ({names}): run it as a task "
                     "of a job array, srun or torchrun, or give SHARD=i/n")


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


# The parts of a sharded predict or evaluate: one JSON file per task, <i>-of-<n>.json in a
# folder beside the output, written atomically (so a part is complete or absent). Each
# records what must agree across tasks ("params", "inputs") and the task's results.


def check_part(folder: Path, shard: Shard) -> None:
    """Refuse, before any work, a task whose part would replace something that is not an
    earlier part of the same shard (a file of the user's that happens to bear its name)."""
    path = folder / f"{shard.name}.json"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder of parts: move it, or give "
                         "another --out")
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("shard") == str(shard)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{path} is not a part this job wrote, and shard {shard} would "
                         "replace it: move it, or give another --out")


def write_part(folder: Path, shard: Shard, record: dict) -> Path:
    """A task's part: `record` (with "params" and "inputs") and its shard."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{shard.name}.json", {**record, "shard": str(shard)})
    return folder / f"{shard.name}.json"


def read_parts(folder: Path, option: str) -> list[dict]:
    """Every part of one job in `folder`, in shard order, once each is there and all agree
    on "params" and "inputs"; ShardError naming each part that is missing or differs, with
    the `option` that runs it again ("--shard")."""
    n = job_size(folder, ".json", f"run each task with {option} i/n first")
    parts, problems = [], []
    for k in range(n):
        path = folder / f"{k}-of-{n}.json"
        try:
            parts.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            problems.append(f"shard {k}/{n} is missing: run it again ({option} {k}/{n})")
    for part in parts[1:]:
        for key, what in (("params", "parameters"), ("inputs", "inputs or another model")):
            if part.get(key) != parts[0].get(key):
                changed = ", ".join(differing(parts[0].get(key) or {}, part.get(key) or {}))
                problems.append(f"shard {part['shard']} was made with other {what} than shard "
                                f"{parts[0]['shard']} ({changed}): run it again ({option} "
                                f"{part['shard']}) with the same")
                break
    if problems:
        raise ShardError(f"cannot merge the parts in {folder}: " + "; ".join(problems))
    return parts


def remove_parts(folder: Path, parts: list[dict]) -> None:
    """The parts once merged (the folder too, when nothing else is in it)."""
    for part in parts:
        (folder / f"{Shard(*map(int, part['shard'].split('/'))).name}.json").unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
