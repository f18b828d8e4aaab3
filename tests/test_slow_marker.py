"""The `slow` marker keeps `python -m pytest -m "not slow"` a fast loop over the package itself.

The rule, checked over every test module of tests/ and benchmarks/ by reading its source (nothing is run): a test
that starts a process (any call of `subprocess.*`: a Python script, torchrun, bash, git) or trains with a Hugging Face
`Trainer(...)` carries `@pytest.mark.slow`, or its module's `pytestmark` does. It counts as doing so when its own
body makes such a call, or calls a function of its module that does (at any depth), or takes a fixture of its module
that does. Calls through another module (a helper imported from elsewhere) are not followed: such a helper would
need the rule extended. The example's own test modules (the example trains) are marked whole by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_spawning_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "subprocess":
        return True
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return name == "Trainer"


def _marked_slow(expressions) -> bool:
    return any("pytest.mark.slow" in ast.unparse(expression) for expression in expressions)


def unmarked_spawning_tests(source: str) -> list[str]:
    """The names of the tests in `source` that start a process or train a Trainer without the `slow` marker."""
    tree = ast.parse(source)
    module_marked = any(isinstance(node, ast.Assign) and _marked_slow([node.value])
                        and any(getattr(target, "id", None) == "pytestmark" for target in node.targets)
                        for node in tree.body)
    functions = {node.name: node for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    spawning = {name for name, node in functions.items()
                if any(isinstance(call, ast.Call) and _is_spawning_call(call) for call in ast.walk(node))}
    changed = True
    while changed:  # a caller of a spawning function, or a user of a spawning fixture, spawns too
        changed = False
        for name, node in functions.items():
            if name in spawning:
                continue
            called = {call.func.id for call in ast.walk(node) if isinstance(call, ast.Call)
                      and isinstance(call.func, ast.Name)}
            parameters = {arg.arg for arg in node.args.args + node.args.kwonlyargs}
            if (called | parameters) & spawning:
                spawning.add(name)
                changed = True
    return sorted(name for name in spawning if name.startswith("test_")
                  and not module_marked and not _marked_slow(functions[name].decorator_list))


def test_every_test_that_starts_a_process_or_trains_a_trainer_is_marked_slow():
    modules = sorted([*ROOT.glob("tests/test_*.py"), *ROOT.glob("benchmarks/test_*.py")])
    assert len(modules) > 20, "the test modules were not found"
    unmarked = {str(path.relative_to(ROOT)): names for path in modules
                if (names := unmarked_spawning_tests(path.read_text()))}
    assert not unmarked, f"mark these @pytest.mark.slow (they start a process or train a Trainer): {unmarked}"


@pytest.mark.parametrize("source, unmarked", [
    # direct calls, a helper at two removes, a fixture, a Trainer; the marked ones pass
    ("import subprocess\ndef test_a():\n    subprocess.run(['x'])\n", ["test_a"]),
    ("import subprocess\ndef run():\n    subprocess.Popen(['x'])\ndef go():\n    run()\ndef test_b():\n    go()\n",
     ["test_b"]),
    ("import pytest, subprocess\n@pytest.fixture\ndef results():\n    return subprocess.run(['x'])\n"
     "def test_c(results):\n    pass\ndef test_d():\n    pass\n", ["test_c"]),
    ("import transformers\ndef test_e():\n    transformers.Trainer(model=None).train()\n", ["test_e"]),
    ("import pytest, subprocess\n@pytest.mark.slow\ndef test_f():\n    subprocess.run(['x'])\n", []),
    ("import pytest, subprocess\npytestmark = [pytest.mark.slow, pytest.mark.skipif(False, reason='')]\n"
     "def test_g():\n    subprocess.run(['x'])\n", []),
    ("import transformers\ndef test_h():\n    transformers.TrainerState()\n", []),
])
def test_the_rule_finds_unmarked_tests_and_accepts_marked_ones(source, unmarked):
    assert unmarked_spawning_tests(source) == unmarked
