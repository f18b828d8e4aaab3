"""The package's imports form no cycle, counting the imports inside functions as well as those at module level.

A cycle hidden in a function-level import still ties two modules into one: neither can be read, tested or moved
without the other. The graph is built from the source with `ast`, so nothing is imported to draw it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relora_kernels

PACKAGE_DIR = Path(relora_kernels.__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """{dotted module name: source file} of every module of the package (a package's name for its __init__.py)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement in `module` names before its `import`."""
    if node.level == 0:
        return node.module or ""
    parent = module.split(".") if is_package else module.split(".")[:-1]
    parent = parent[:len(parent) - (node.level - 1)]
    return ".".join(parent + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its source}. `from a import b` counts as importing a.b
    where that is a module, else a itself."""
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _imported_base(module, is_package, node)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in modules else base)
        graph[module] = {target for target in targets if target in modules and target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [m0, m1, ..., m0], or None if it has none (iterative depth-first search)."""
    state = dict.fromkeys(graph, "unseen")
    for root in sorted(graph):
        if state[root] != "unseen":
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = "on path"
        while stack:
            successor = next(stack[-1], None)
            if successor is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state[successor] == "on path":
                return path[path.index(successor):] + [successor]
            elif state[successor] == "unseen":
                state[successor] = "on path"
                path.append(successor)
                stack.append(iter(sorted(graph[successor])))
    return None


def test_the_package_imports_form_no_cycle():
    modules = module_files()
    graph = import_graph(modules)
    assert f"{PACKAGE}.functional" in graph and graph[f"{PACKAGE}.functional"], "the graph found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_function_level_and_relative_import_cycles(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from . import b\n")
    (package / "sub" / "b.py").write_text("from ..c import helper\n")
    (package / "c.py").write_text("def helper():\n    from .sub.a import thing\n")
    graph = import_graph(module_files(package))
    assert graph["pkg.sub.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub.a"}
    assert find_cycle(graph) == ["pkg.c", "pkg.sub.a", "pkg.sub.b", "pkg.c"]
    (package / "c.py").write_text("def helper():\n    pass\n")
    assert find_cycle(import_graph(module_files(package))) is None
