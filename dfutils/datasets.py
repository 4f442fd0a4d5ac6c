"""Input data as it lies on disk: every layout the toolkit reads, one reader each in READERS.

A folder is walked safely (`tree`, `walk_files`): links to folders are followed once, loops
are named, FIFOs and devices are never opened, names that are not UTF-8 are reported. The
toolkit's own layout is raw_dir/real and raw_dir/fake (`scan_classes`, the reader
"folder"); the field's data sets are read as their authors publish them: FaceForensics++
(and its DeepFakeDetection part), Celeb-DF v1/v2 and DFDC.

Each reader walks one layout and returns a `Listing`: for every clip (or photo) its path
relative to the data set's root, its label, its group keys (what must stay on one side of
a split: a clip goes to a split only together with every other clip that shares a key),
its official split when the data set has one, and its manipulation method. A layout that
is incomplete (a listed video missing, a fake whose original is absent, a method folder
missing) gives a problem per thing missing, by name, and the rest is read. Nothing is ever
written into the data set's folders.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Labels everywhere: fake = 1, real = 0, by the names of the class folders (never by their
# order: torchvision's ImageFolder would sort `fake` first and give the opposite).
LABELS = {"real": 0, "fake": 1}
CLASSES = ("real", "fake")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
# FF++'s manipulations, by folder name.
FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
# The methods FF++ publishes a mask video of the manipulated region for (FaceShifter, added
# later, has none): manipulated_sequences/<method>/masks/videos/<name>.mp4.
MASKED_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "DeepFakeDetection")


class MissingInput(ValueError):
    """The raw folder, a class folder, or the files in one are missing."""


# -- Walking a folder --------------------------------------------------------------------

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


def tree(folder: Path, seen: set[tuple[int, int]] | None = None,
         avoid: Mapping[tuple[int, int], str] | None = None) -> Iterator[tuple[Path, str]]:
    """Every file below `folder`, depth first in sorted order (the order of
    sorted(folder.rglob("*"))), as (path, ""). Links to folders are followed, each real
    folder once: a link back to a folder already walked (a loop, or the same folder twice),
    or to one of `avoid` ((device, inode) -> why), comes out as (link, why it was not
    followed), so a loop ends and nothing is silent."""
    seen = seen if seen is not None else set()
    avoid = avoid or {}
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
        if (info.st_dev, info.st_ino) in avoid:
            yield path, (f"a link to {os.path.realpath(path)}, "
                         f"{avoid[info.st_dev, info.st_ino]}: not followed")
            continue
        if (info.st_dev, info.st_ino) in seen:
            yield path, (f"a link to {os.path.realpath(path)}, a folder already read (a "
                         "loop, or the same folder twice): not followed")
            continue
        yield from tree(path, seen, avoid)


def walk_files(root: Path, folder: Path, suffixes: set[str], kinds: str,
               avoid: Mapping[tuple[int, int], str] | None = None
               ) -> Iterator[tuple[Path, str, str]]:
    """Every file below `folder`, sorted, as (path relative to `root`, that path as text,
    why it is skipped or ""): not a regular file, a name that is not UTF-8, or a suffix
    (any letter case) outside `suffixes`, which `kinds` names for the user. Links to
    folders are followed (`tree`, but not into `avoid`)."""
    for path, loop in tree(folder, avoid=avoid):
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


def is_clip(path: str | os.PathLike) -> bool:
    """Whether a file is a video clip (by its suffix, any letter case)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def suffix_list(suffixes: frozenset[str]) -> str:
    """Suffixes for a message: `.jpeg, .jpg or .png`."""
    names = sorted(suffixes)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def scan_classes(raw_dir: Path, suffixes: frozenset[str], what: str,
                 leave_out: Callable[[Path], bool] = lambda rel: False, need_each: bool = False
                 ) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Every file below raw_dir/real and raw_dir/fake as (path relative to raw_dir, label),
    and the files skipped, each {"path", "reason"}; `leave_out` drops files silently (masks),
    `what` names the files in messages ("images"). MissingInput when a folder is missing,
    or, with `need_each`, when a class has no usable file."""
    if not raw_dir.is_dir():
        raise MissingInput(f"raw folder {raw_dir} does not exist: create {raw_dir}/real and "
                           f"{raw_dir}/fake and put your {what} there")
    kinds = suffix_list(suffixes)
    found, skipped = [], []
    for label in CLASSES:
        if not (raw_dir / label).is_dir():
            raise MissingInput(f"class folder {raw_dir / label} is missing: put your {label} "
                               f"{what} in it (subfolders are fine)")

    def identity(folder: Path) -> tuple[int, int]:
        info = folder.stat()
        return info.st_dev, info.st_ino

    for label in CLASSES:
        class_dir = raw_dir / label
        # A link back to the raw folder, or into the other class's folder, would give one
        # image both labels: such a link is skipped with its reason.
        avoid = {identity(raw_dir): "the raw folder itself (the classes would mix)",
                 **{identity(raw_dir / other): f"the {other} class folder (the classes "
                    "would mix)" for other in CLASSES if other != label}}
        before = len(found)
        for rel, shown, problem in walk_files(raw_dir, class_dir, suffixes, kinds, avoid):
            if problem:
                skipped.append({"path": shown, "reason": problem})
            elif not leave_out(rel):
                found.append((rel, label))
        if need_each and len(found) == before:
            raise MissingInput(f"class folder {class_dir} holds no {kinds} files: add at "
                               "least two")
    return found, skipped


# -- The data sets ------------------------------------------------------------------------

CELEBDF_LIST = "List_of_testing_videos.txt"
DFDC_METADATA, DFDC_LABELS = "metadata.json", "labels.csv"
KEY_SEPARATOR = "|"  # between the group keys of one item, in faces.csv's `group`


@dataclass(frozen=True)
class Item:
    """One clip or photo of a data set."""

    path: str  # relative to the data set's root, POSIX separators
    label: str  # "real" or "fake"
    keys: tuple[str, ...] = ()  # group keys: every clip sharing one goes to the same split
    split: str = ""  # the official split ("train", "val", "test"), or "" when none
    method: str = ""  # the manipulation (FF++: Deepfakes, ...); "" for reals and elsewhere
    mask: str = ""  # its published mask video, relative to the root (FF++'s fakes), or ""

    @property
    def group(self) -> str:
        return KEY_SEPARATOR.join(self.keys)


@dataclass
class Listing:
    """What a reader found: the items, the problems (each {"path", "reason"}) and the rules
    that decide each split, in words (for the reports)."""

    items: list[Item] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)

    def problem(self, path: str | Path, reason: str) -> None:
        self.problems.append({"path": Path(path).as_posix(), "reason": reason})


def _videos(root: Path, folder: str, listing: Listing, required: bool = True) -> list[Path]:
    """The video files directly in root/folder, sorted; a missing folder is a problem."""
    where = root / folder
    if not where.is_dir():
        if required:
            listing.problem(folder, "folder missing: download it, or leave this part out "
                            "with the parameters")
        return []
    return sorted(p for p in where.iterdir()
                  if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def stays_inside(name: object) -> str:
    """Why a name a data set lists (a path relative to its folder) cannot be read as one
    there, or "" when it can: it must be a relative path that does not climb out with
    `..`. A list is the data set's, not ours: nothing it names may lead outside."""
    if not isinstance(name, str) or not name.strip():
        return f"{name!r} is not a file name"
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute():
        return f"{name!r} is an absolute path: a data set lists its files relative to its folder"
    if ".." in parts:
        return f"{name!r} leads outside the data set's folder (..)"
    return ""


def _text(path: Path, where: str, listing: Listing) -> str | None:
    """A data set's list file as text, or None and a problem naming it (a folder in its
    place, not UTF-8, unreadable)."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        listing.problem(where, "a folder, not a file: remove it or put the data set's file "
                        "there; left out")
    except UnicodeDecodeError as error:
        listing.problem(where, f"not UTF-8 text ({error.reason} at byte {error.start}): save "
                        "it as UTF-8; left out")
    except OSError as error:
        listing.problem(where, f"cannot be read ({error.strerror or error}); left out")
    return None


# -- FaceForensics++ ---------------------------------------------------------------------

_FFPP_ID = re.compile(r"^\d{3}$")  # an original's id: 000 to 999


def ffpp_pairs(root: Path, listing: Listing) -> dict[str, tuple[str, tuple[str, str]]]:
    """Each original's id -> (its official split, its pair), from root/splits/*.json. A
    pair that is not two ids, a pair in two files and an id in two pairs are problems
    naming the files; such ids are left out of `owner` (their clips then say so)."""
    listed: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for split in ("train", "val", "test"):
        where = f"splits/{split}.json"
        path = root / where
        if not path.exists():
            listing.problem(where, "missing: copy the official split files "
                            "(dataset/splits/ of github.com/ondyari/FaceForensics) to splits/")
            continue
        text = _text(path, where, listing)
        try:
            pairs = json.loads(text) if text is not None else None
        except ValueError:
            pairs = "?"
        if pairs is None:
            continue
        if not isinstance(pairs, list):
            listing.problem(where, "not a JSON list of [a, b] pairs: left out")
            continue
        for number, pair in enumerate(pairs, 1):
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(v, str) and _FFPP_ID.match(v) for v in pair)):
                listing.problem(where, f"pair {number}, {pair!r}, is not two ids like "
                                "[\"071\", \"054\"]: left out")
                continue
            for video in pair:
                listed.setdefault(video, []).append((split, tuple(pair)))
    owner = {}
    for video, places in sorted(listed.items()):
        if len(set(places)) > 1:
            said = "; ".join(f"[{a}, {b}] in splits/{split}.json" for split, (a, b)
                             in dict.fromkeys(places))
            listing.problem(f"splits: {video}", f"listed in more than one place ({said}): "
                            "its clips are left out; correct the split files")
            continue
        owner[video] = places[0]
    return owner


def read_ffpp(root: Path, methods: Iterable[str] = (), compression: str = "c23") -> Listing:
    """FaceForensics++: original_sequences/youtube/<comp>/videos/NNN.mp4 and
    manipulated_sequences/<method>/<comp>/videos/AAA_BBB.mp4, split by splits/*.json.

    A pair [a, b] owns the originals a and b and the fakes a_b and b_a: all of them go to the
    pair's split. Without the split files, clips are kept together by the ids in their names
    (train/val drawn by the split step; no test).
    """
    listing = Listing(rules={
        "test": "FF++'s official splits/test.json (a pair [a, b] owns a, b, a_b and b_a)",
        "val": "FF++'s official splits/val.json (same ownership)",
        "train": "FF++'s official splits/train.json (same ownership)"})
    owner = ffpp_pairs(root, listing)
    chosen = list(methods) or [m for m in FFPP_METHODS
                               if (root / "manipulated_sequences" / m).is_dir()]

    def place(ids: tuple[str, ...], rel: str) -> str | None:
        """The official split of a clip with these ids; None (and a problem) if unlisted."""
        if not owner and not any((root / "splits").glob("*.json")):
            return ""
        splits = {owner[i][0] for i in ids if i in owner}
        if len(splits) != 1 or any(i not in owner for i in ids):
            listing.problem(rel, "not in exactly one pair of splits/*.json: left out")
            return None
        return splits.pop()

    originals = set()
    for path in _videos(root, f"original_sequences/youtube/{compression}/videos", listing):
        rel = _rel(root, path)
        split = place((path.stem,), rel)
        originals.add(path.stem)
        if split is not None:
            listing.items.append(Item(rel, "real", (f"ffpp:{path.stem}",), split))
    for method in chosen:
        folder = f"manipulated_sequences/{method}/{compression}/videos"
        found = _videos(root, folder, listing)
        if not found and (root / folder).is_dir():
            listing.problem(folder, "holds no video: download the method's clips, or leave it "
                            "out with methods=")
        for path in found:
            rel, ids = _rel(root, path), tuple(path.stem.split("_"))
            if len(ids) != 2 or not all(_FFPP_ID.match(i) for i in ids):
                listing.problem(rel, "a fake is named <target>_<source>.mp4 (two ids like "
                                "071_054): left out")
                continue
            if owner and tuple(owner.get(ids[0], ("", ()))[1]) not in (ids, ids[::-1]):
                listing.problem(rel, f"{ids[0]} and {ids[1]} are not a pair of splits/*.json:"
                                " left out")
                continue
            split = place(ids, rel)
            if split is None:
                continue
            for original in ids:
                if original not in originals:
                    listing.problem(rel, f"its original {original} is missing from "
                                    f"original_sequences/youtube/{compression}/videos")
            listing.items.append(Item(rel, "fake", tuple(f"ffpp:{i}" for i in ids), split,
                                      method, mask_video(method, path.stem)))
    for video, (split, _) in sorted(owner.items()):
        if video not in originals:
            listing.problem(f"original_sequences/youtube/{compression}/videos/{video}.mp4",
                            f"listed in splits/{split}.json but missing")
    return listing


def mask_video(method: str, name: str) -> str:
    """Where FF++ publishes the mask video of a method's clip (whether it was downloaded or
    not: the faces step says so per clip), or "" for a method without masks."""
    if method not in MASKED_METHODS:
        return ""
    return f"manipulated_sequences/{method}/masks/videos/{name}.mp4"


def read_dfd(root: Path, methods: Iterable[str] = (), compression: str = "c23") -> Listing:
    """DeepFakeDetection (FF++'s DFD part), a test-only set: original_sequences/actors/
    <comp>/videos/AA__scene.mp4 and manipulated_sequences/DeepFakeDetection/<comp>/videos/
    AA_BB__scene__XXXX.mp4; a fake's actors are its keys."""
    listing = Listing(rules={"test": "every clip: DFD is a test-only set"})
    for folder, label in ((f"original_sequences/actors/{compression}/videos", "real"),
                          (f"manipulated_sequences/DeepFakeDetection/{compression}/videos",
                           "fake")):
        for path in _videos(root, folder, listing):
            actors = path.stem.split("__")[0].split("_")
            method = "DeepFakeDetection" if label == "fake" else ""
            listing.items.append(Item(_rel(root, path), label,
                                      tuple(f"dfd:{a}" for a in actors), "test", method,
                                      mask_video(method, path.stem)))
    return listing


# -- Celeb-DF ----------------------------------------------------------------------------

CELEBDF_FOLDERS = {"Celeb-real": "real", "YouTube-real": "real", "Celeb-synthesis": "fake"}
_IDENTITY = re.compile(r"^(id\d+)_(?:(id\d+)_)?\d+$")


def read_celebdf(root: Path, methods: Iterable[str] = (), compression: str = "c23") -> Listing:
    """Celeb-DF v1/v2: Celeb-real/idX_NNNN.mp4, YouTube-real/NNNNN.mp4,
    Celeb-synthesis/idX_idY_NNNN.mp4 and List_of_testing_videos.txt.

    The list's lines are `<1 real | 0 fake> <path>` (1 is real here, the opposite of every
    other set); a line whose label contradicts its folder is a problem naming the line, and
    that video is left out. Listed videos are the test split; the others have identities as
    keys (a swap idX_idY has both), so the split step keeps every identity on one side.
    """
    listing = Listing(rules={
        "test": f"Celeb-DF's official {CELEBDF_LIST} (1 = real, 0 = fake)",
        "train/val": "by identity: a clip goes where all its identities (target and source "
                     "of a swap) go; YouTube-real clips each alone"})
    tested: dict[str, str] = {}
    listed = root / CELEBDF_LIST
    text = _text(listed, CELEBDF_LIST, listing) if listed.exists() else None
    if not listed.exists():
        listing.problem(CELEBDF_LIST, "missing: without it there is no test split")
    if text is not None:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            label, _, rel = line.strip().partition(" ")
            folder = rel.split("/", 1)[0]
            where = f"{CELEBDF_LIST} line {number}"
            if label not in ("0", "1") or folder not in CELEBDF_FOLDERS or (
                    stays_inside(rel) or len(PurePosixPath(rel).parts) != 2):
                listing.problem(where, f"{line.strip()!r} is not `<1|0> <folder>/<video>` with "
                                f"a folder of {', '.join(CELEBDF_FOLDERS)}: left out")
                continue
            if tested.get(rel) is not None:
                listing.problem(where, f"{rel} is listed twice: the line is left out")
                continue
            said = "real" if label == "1" else "fake"
            if said != CELEBDF_FOLDERS[folder]:
                listing.problem(where, f"says {label} ({said}) but {rel} is in {folder}, a "
                                f"{CELEBDF_FOLDERS[folder]} folder: left out")
                tested[rel] = ""
                continue
            tested[rel] = said
            if not (root / rel).is_file():
                listing.problem(rel, f"listed at {where} but missing")
    for folder, label in CELEBDF_FOLDERS.items():
        for path in _videos(root, folder, listing):
            rel = _rel(root, path)
            if tested.get(rel) == "":
                continue  # contradicted by the list: reported above
            found = _IDENTITY.match(path.stem)
            if folder == "YouTube-real" or not found:
                keys = (f"celebdf:{rel}",)
                if folder != "YouTube-real":
                    listing.problem(rel, "no idX in its name: kept as a group of its own")
            else:
                keys = tuple(f"celebdf:{i}" for i in found.groups() if i)
            listing.items.append(Item(rel, label, keys, "test" if rel in tested else ""))
    return listing


# -- DFDC --------------------------------------------------------------------------------

def read_dfdc(root: Path, methods: Iterable[str] = (), compression: str = "c23") -> Listing:
    """DFDC: dfdc_train_part_N/metadata.json ({"x.mp4": {"label": "REAL"|"FAKE",
    "original": "y.mp4"}}) beside its clips, and the public test set's labels.csv
    (`filename,label`, 1 = fake) beside its clips (or their videos/ folder).

    A fake's key is its original, so it stays with it; labels.csv's clips are the test split.
    """
    listing = Listing(rules={
        "test": f"DFDC's public test set ({DFDC_LABELS})",
        "train/val": "by original: a fake goes where its original goes"})
    parts = sorted(p.parent for p in root.glob(f"*/{DFDC_METADATA}")) + (
        [root] if (root / DFDC_METADATA).is_file() else [])
    tests = sorted(p.parent for p in root.glob(f"*/{DFDC_LABELS}")) + (
        [root] if (root / DFDC_LABELS).is_file() else [])
    if not parts and not tests:
        listing.problem(".", f"no */{DFDC_METADATA} or */{DFDC_LABELS}: is this the DFDC "
                        "folder?")
    everything: dict[str, str] = {}  # every clip name in any metadata -> its label
    entries: list[tuple[Path, str, dict]] = []
    for part in parts:
        where = _rel(root, part / DFDC_METADATA) if part != root else DFDC_METADATA
        text = _text(part / DFDC_METADATA, where, listing)
        try:
            metadata = json.loads(text) if text is not None else None
        except ValueError:
            metadata = []
        if metadata is None:
            continue
        if not isinstance(metadata, dict):
            listing.problem(where, "not a JSON object of {clip: {label, original}}: part left "
                            "out")
            continue
        for name, entry in sorted(metadata.items()):
            label = str(entry.get("label", "")).upper() if isinstance(entry, dict) else ""
            why = stays_inside(name)
            if why:
                listing.problem(f"{where}: {name}", f"{why}: left out")
            elif label not in ("REAL", "FAKE"):
                listing.problem(f"{where}: {name}", "label is not REAL or FAKE: left out")
            elif name in everything:
                listing.problem(f"{where}: {name}", f"listed in another {DFDC_METADATA} too: "
                                "left out here")
            else:
                everything[name] = label
                entries.append((part, name, entry))
    for part, name, entry in entries:
        path = part / name
        rel = _rel(root, path)
        if not path.is_file():
            listing.problem(rel, f"listed in {DFDC_METADATA} but missing")
            continue
        if everything[name] == "REAL":
            listing.items.append(Item(rel, "real", (f"dfdc:{Path(name).stem}",)))
            continue
        original = entry.get("original") or ""
        if not isinstance(original, str) or stays_inside(original):
            listing.problem(rel, f"its `original`, {original!r}, is not a clip's name: kept "
                            "alone")
            original = ""
        elif not original:
            listing.problem(rel, "a fake without `original` in its metadata: kept alone")
        elif original not in everything:
            listing.problem(rel, f"its original {original} is in no {DFDC_METADATA}: kept with "
                            "its name")
        listing.items.append(Item(rel, "fake", (f"dfdc:{Path(original or name).stem}",)))
    for folder in tests:
        where = _rel(root, folder / DFDC_LABELS) if folder != root else DFDC_LABELS
        text = _text(folder / DFDC_LABELS, where, listing)
        if text is None:
            continue
        rows: dict[str, tuple[int, str]] = {}  # clip -> (its line, its label)
        for number, row in enumerate(csv.DictReader(text.splitlines()), 2):
            name, label = (row.get("filename") or "").strip(), (row.get("label") or "").strip()
            label = {"1": "fake", "0": "real", "FAKE": "fake", "REAL": "real"}.get(label.upper())
            why = stays_inside(name) if name else ""
            if not name or label is None or why:
                listing.problem(f"{where} line {number}", f"{why}: left out" if why else
                                "needs `filename,label` with label 1 (fake) or 0 (real): left "
                                "out")
                continue
            if name in rows:
                first, said = rows[name]
                listing.problem(f"{where} line {number}", f"{name} is listed at line {first} "
                                "too" + ("" if said == label else f" as {said}") + ": the "
                                "line is left out" + ("" if said == label else
                                                      ", and the clip with it"))
                if said != label:
                    rows[name] = (first, "")
                continue
            rows[name] = (number, label)
        for name, (_, label) in rows.items():
            if not label:  # listed with both labels
                continue
            path = next((p for p in (folder / name, folder / "videos" / name) if p.is_file()),
                        None)
            if path is None:
                listing.problem(f"{_rel(root, folder / name) if folder != root else name}",
                                f"listed in {where} but missing")
                continue
            listing.items.append(Item(_rel(root, path), label,
                                      (f"dfdc-test:{Path(name).stem}",), "test"))
    return listing


# -- The toolkit's own layout ------------------------------------------------------------

def read_folder(root: Path, methods: Iterable[str] = (), compression: str = "c23") -> Listing:
    """raw_dir/real and raw_dir/fake, any depth: no keys, no official split (the split step
    groups and assigns them)."""
    found, skipped = scan_classes(root, IMAGE_SUFFIXES | VIDEO_SUFFIXES, "photos or clips")
    return Listing([Item(rel.as_posix(), label) for rel, label in found],
                   [{"path": s["path"], "reason": s["reason"]} for s in skipped])


# The terms each published data set is distributed under, as a model card names them.
TERMS = {
    "ffpp": "FaceForensics++, distributed under the FaceForensics Terms of Use (research "
            "only, no redistribution): https://github.com/ondyari/FaceForensics",
    "dfd": "Google's DeepFakeDetection (DFD), distributed with FaceForensics++ under the "
           "FaceForensics Terms of Use: https://github.com/ondyari/FaceForensics",
    "celebdf": "Celeb-DF, distributed under its authors' terms of use (non-commercial "
               "research only): https://github.com/yuezunli/celeb-deepfakeforensics",
    "dfdc": "the DeepFake Detection Challenge data set, distributed under the DFDC data set "
            "licence agreement: https://ai.meta.com/datasets/dfdc/"}

READERS: dict[str, Callable[..., Listing]] = {
    "folder": read_folder, "ffpp": read_ffpp, "dfd": read_dfd, "celebdf": read_celebdf,
    "dfdc": read_dfdc}


def read(dataset: str, root: Path, methods: Iterable[str] = (), compression: str = "c23"
         ) -> Listing:
    """The items of data set `dataset` (a key of READERS) under root; `methods` and
    `compression` are read by the readers they apply to (FF++, DFD) and ignored by the
    others."""
    return READERS[dataset](root, methods, compression)
