"""The shape docs/architecture.md promises: the package's import graph is at most 7 modules
tall, and no module imports the package inside a function (an import there hides a
dependency from whoever reads the top of the file)."""

import ast
import functools

from dfutils.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "dfutils"


def imports() -> tuple[dict[str, set[str]], list[str]]:
    """Each module's dfutils modules (at module level or inside functions; the package's
    __init__ counts as a module), and the imports made inside functions."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph, inside = {}, []
    for name in modules:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        nested = {id(node) for function in ast.walk(tree)
                  if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
                  for node in ast.walk(function) if node is not function}
        found = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dfutils":
                targets = ([a.name if a.name in modules else "__init__" for a in node.names]
                           if node.module == "dfutils" else [node.module.split(".")[1]])
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names
                           if a.name.startswith("dfutils.")]
            targets = [t for t in targets if t != name]
            found |= set(targets)
            if targets and id(node) in nested:
                inside.append(f"{name}.py:{node.lineno}")
        graph[name] = found
    return graph, inside


def chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of modules importing each other."""
    @functools.cache
    def longest(name: str) -> tuple[str, ...]:
        return (name, *max((longest(d) for d in graph[name]), key=len, default=()))

    return list(max((longest(name) for name in graph), key=len))


def test_the_import_graph_is_at_most_seven_modules_tall():
    found = chain(imports()[0])
    assert len(found) <= 7, " -> ".join(found)


def test_the_package_imports_nothing_of_itself_inside_a_function():
    assert imports()[1] == []
