"""Notebooks and their parameters cells: the cell each notebook must have (written from its
parameter class), reading a cell back, checking every notebook against its class, reading
a notebook's validated parameters from its globals, and the parameter reference of docs/.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import textwrap
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
import papermill

from dfutils.jupyter import commit_problems
from dfutils.params import Params, choices

_PLAIN = (bool, int, float, str, type(None))


def validated(cls: type[Params], namespace: Mapping[str, Any]) -> Params:
    """A notebook's parameters from its globals, validated, in the cell after its
    parameters cell: `params = validated(TrainParams, globals())`.

    Papermill assigns its values in a cell after the parameters cell; a name the notebook
    does not declare becomes a new global there. Python keeps globals in the order they
    were first assigned, so such names are the plain values that come after the last
    declared parameter and before the first thing this cell imports; they are refused.
    """
    names = list(namespace)
    last = max(names.index(n) for n in cls.names() if n in namespace)
    unknown = []
    for name in names[last + 1:]:
        if name.startswith("_"):
            continue  # IPython's own (_i2, _oh, ...)
        value = namespace[name]
        if not isinstance(value, (*_PLAIN, list, dict)):
            break  # this cell's first import: what follows is the notebook's own
        unknown.append(name)
    values = {name: namespace[name] for name in cls.names() if name in namespace}
    return cls.from_mapping(cls.coerce({**values, **{k: namespace[k] for k in unknown}}))


def comment(f: dataclasses.Field, annotation: Any) -> str:
    """The comment a notebook's parameters cell carries for a field: its help, and the
    allowed values of an option."""
    return " ".join(_comment_parts(f, annotation))


def _comment_parts(f: dataclasses.Field, annotation: Any) -> list[str]:
    options = choices(annotation)
    return [f.metadata["help"]] + ([f"(one of {', '.join(map(json.dumps, options))})"]
                                   if options else [])


def literal(value: Any) -> str:
    """A default as Python source, strings in double quotes (as the notebooks write them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(literal, value)) + "]"
    return repr(value)


def parameters_cell(cls: type[Params], width: int = 100) -> str:
    """The `parameters` cell a notebook must have: `name = default  # help`, one per
    parameter, long comments continued on comment lines (which papermill ignores)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        head = f"{f.name} = {literal(cls.defaults()[f.name])}  # "
        text = [line for part in _comment_parts(f, hints[f.name])
                for line in textwrap.wrap(part, width - len(head))]
        lines.append(head + text[0])
        lines += [" " * (len(head) - 2) + "# " + more for more in text[1:]]
    return "\n".join(lines)


def read_parameters_cell(source: str) -> list[tuple[str, Any, str]]:
    """(name, value, comment) of each `name = value  # comment` line of a parameters cell,
    comment lines that follow joined to the comment; ValueError on any other statement."""
    lines = source.splitlines()
    found = []
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"line {node.lineno} is not `name = value`")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{node.targets[0].id!r} is not a plain value (derive values in "
                             "the next cell)") from None
        _, _, text = lines[node.lineno - 1].partition("#")
        parts = [text.strip()]
        for more in lines[node.lineno:]:
            if not more.lstrip().startswith("#"):
                break
            parts.append(more.lstrip()[1:].strip())
        found.append((node.targets[0].id, value, " ".join(p for p in parts if p)))
    return found




def reference(classes: Sequence[type[Params]]) -> str:
    """Every parameter of the steps' classes as Markdown tables: docs/parameters.md."""
    hints = {cls: typing.get_type_hints(cls) for cls in classes}
    parts = []
    for cls in classes:
        rows = [f"**`{cls.step}`** ({cls.__doc__.split(': ', 1)[1].rstrip('.')})", "",
                "| parameter | default | what it does |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = cls.defaults()[f.name]
            rows.append(f"| `{f.name}` | `{literal(default)}` | "
                        f"{comment(f, hints[cls][f.name]).replace('|', '/')} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def check_notebooks(paths: Sequence[str | Path], steps: Mapping[str, Any],
                    fix: bool = False) -> list[str]:
    """Problems with notebooks: what a commit would carry (`commit_problems`), that each is
    the notebook of a step of `steps` (name -> an entry with its `params` class), and their
    parameters cells: exactly one, the first code cell, and the same names, order, defaults
    and comments as the step's parameter class. `fix` rewrites a cell that differs from
    the class (the class is the one source)."""
    problems = []
    for path in paths:
        problems += commit_problems(Path(path))
        if Path(path).stem not in steps:
            problems.append(f"{path}: no step of dfutils.pipeline.STEPS is called "
                            f"{Path(path).stem!r}: add its entry, or name the notebook after "
                            "its step")
            continue
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
        if len(tagged) != 1 or tagged[0] != 0:
            problems.append(f"{path}: needs exactly one cell tagged 'parameters', as its first "
                            f"code cell (found at code cells {tagged})")
            continue
        cls = steps[Path(path).stem].params
        expected = read_parameters_cell(parameters_cell(cls))
        try:
            found = read_parameters_cell(code[0].source)
        except ValueError as error:
            found, problem = [], f"{path}: parameters cell: {error}"
        else:
            problem = _cell_difference(path, cls, found, expected)
        if problem and fix:
            code[0].source = parameters_cell(cls)
            nbformat.write(nb, str(path))
            found, problem = expected, ""
        if problem:
            problems.append(problem + " (python -m dfutils check-notebooks --fix writes the "
                            f"cell from {cls.__name__})")
            continue
        unparsed = {name for name, _, _ in found} - set(papermill.inspect_notebook(str(path)))
        problems += [f"{path}: papermill cannot parse parameter {name!r}" for name in unparsed]
    return problems


def _cell_difference(path: str | Path, cls: type, found: list, expected: list) -> str:
    """The first way a parameters cell differs from its class, or ""."""
    names, wanted = [f[0] for f in found], [e[0] for e in expected]
    missing, extra = [n for n in wanted if n not in names], [n for n in names if n not in wanted]
    if missing or extra:
        return (f"{path}: parameters cell and {cls.__name__} differ: missing "
                f"{missing or 'none'}, extra {extra or 'none'}")
    if names != wanted:
        return f"{path}: parameters are not in {cls.__name__}'s order {wanted}"
    for (name, value, text), (_, default, help_text) in zip(found, expected, strict=True):
        if value != default or type(value) is not type(default):
            return f"{path}: {name} = {value!r} but {cls.__name__}'s default is {default!r}"
        if text != help_text:
            return f"{path}: the comment of {name} is not {cls.__name__}'s help {help_text!r}"
    return ""
