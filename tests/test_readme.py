"""Every ```python snippet of README.md runs as written, each in a fresh namespace (a reader copies them one by one),
and every backticked reference to a file or a name of this repository in the docs resolves."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import relora_kernels as rk

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_the_snippets_the_docs_promise():
    text = "\n".join(SNIPPETS)
    for call in ("rk.lora_linear(", "rk.LoRALinear(", "rk.apply_lora(", "torch.compile(", "torch.autocast(",
                 "rk.save_peft_adapter(", "rk.load_peft_adapter(", "peft.PeftModel.from_pretrained(", "ReLoRA(",
                 "ReLoRACallback(", "jagged_cosine_scheduler("):
        assert call in text, f"no README snippet shows {call}"


def _snippet(index: int):
    """A snippet that trains with the Hugging Face Trainer is slow (the `slow` marker, tests/test_slow_marker.py)."""
    marks = [pytest.mark.slow] if "Trainer(" in SNIPPETS[index] else []
    return pytest.param(index, marks=marks, id=SNIPPETS[index].splitlines()[-1][:40])


@pytest.mark.parametrize("index", [_snippet(i) for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    monkeypatch.delenv("RELORA_KERNELS_BACKEND", raising=False)  # what a user gets by default
    torch.manual_seed(0)
    torch._dynamo.reset()
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})


# The docs whose references are checked, and what counts as one (test_doc_references_resolve's docstring).
DOCS = ("README.md", "docs/DESIGN.md", "benchmarks/README.md")
PACKAGE = ROOT / "relora_kernels"
SOURCE_FILE = re.compile(r"\.(py|sh)$")
FILE_NAME = re.compile(r"\.(py|sh|md|json|jsonl|toml|txt|log|png|safetensors)$")  # `functional.py` is no dotted name
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")  # a.b.c, also called: a.b(...)
NAME_ROOTS = ("relora_kernels", "rk", "benchmarks", "examples", "tests")
MODULE_COMMAND = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return listed.stdout.split() if listed.returncode == 0 else [
        str(path.relative_to(ROOT)) for path in ROOT.rglob("*") if path.is_file() and ".git" not in path.parts]


TRACKED = _tracked_files()
REPO_FOLDERS = {path.split("/")[0] for path in TRACKED if "/" in path}
PACKAGE_FOLDERS = {path.split("/")[1] for path in TRACKED if path.startswith("relora_kernels/") and path.count("/") > 1}
# Modules a name can start with: the package's and the benchmarks' modules by their file's stem (`policy.py` ->
# relora_kernels.kernels.policy), unless an installed package has that name (`transformers` is Hugging Face's).
MODULE_STEMS: dict[str, list[str]] = {}
for _path in TRACKED:
    if _path.endswith(".py") and _path.startswith(("relora_kernels/", "benchmarks/")) and "__init__" not in _path:
        _stem = Path(_path).stem
        if _stem not in sys.modules and importlib.util.find_spec(_stem) is None:
            MODULE_STEMS.setdefault(_stem, []).append(_path[:-3].replace("/", "."))


def doc_references(text: str) -> list[str]:
    """The references of a markdown text, outside its fenced code blocks: each as "link:PATH", "file:PATH",
    "name:DOTTED" or "module:NAME" (see test_doc_references_resolve)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found = [f"link:{target}" for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in target]
    for span in re.findall(r"`([^`\n]+)`", text):
        found += [f"module:{name}" for name in MODULE_COMMAND.findall(span)]
        for token in span.split():
            if any(c in token for c in "<>~$") or "://" in token:
                continue  # a placeholder, a home folder, a variable, a URL
            first = token.split("/")[0]
            if "/" in token and (first in REPO_FOLDERS or first in PACKAGE_FOLDERS):
                found.append(f"file:{token}")
            elif "/" not in token and SOURCE_FILE.search(token):
                found.append(f"file:{token}")
        match = DOTTED.match(span)
        if match and not FILE_NAME.search(match[1]):
            first = match[1].split(".")[0]
            if first in NAME_ROOTS or first in MODULE_STEMS or first in rk.__all__:
                found.append(f"name:{match[1]}")
    return found


def _resolves_file(path: str, doc_dir: Path) -> bool:
    if "/" not in path:  # a bare source file name: a tracked file of that name anywhere in the repository
        return any(Path(tracked).name == path for tracked in TRACKED)
    for base in (ROOT, doc_dir, PACKAGE):
        if glob.glob(str(base / path)):
            return True
    return False


def _has_attribute(obj, name: str) -> tuple[bool, object]:
    if hasattr(obj, name):
        return True, getattr(obj, name)
    fields = {field.name for field in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if isinstance(obj, type) and (name in getattr(obj, "__annotations__", {}) or name in fields):
        return True, None  # a field of instances
    return False, None


def _resolves_name(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] == "rk":
        candidates = [("relora_kernels", parts[1:])]
    elif parts[0] in ("examples", "tests"):
        candidates = [(parts[1], parts[2:])] if len(parts) > 1 else []  # their folders are on sys.path, not packages
    elif parts[0] in ("relora_kernels", "benchmarks"):
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts), 0, -1)]
    elif parts[0] in MODULE_STEMS:
        candidates = [(module, parts[1:]) for module in MODULE_STEMS[parts[0]]]
    else:  # a name the package exports: LoRALinear.from_linear
        candidates = [("relora_kernels", parts)]
    for module_name, attributes in candidates:
        if not attributes:  # a module: found without importing it (and what it imports, transformers say)
            try:
                if importlib.util.find_spec(module_name) is not None:
                    return True
            except ImportError:
                pass
            continue
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        for i, attribute in enumerate(attributes):
            found, value = _has_attribute(obj, attribute)
            if not found:
                try:  # a submodule not imported yet
                    value = importlib.import_module(f"{module_name}.{'.'.join(attributes[:i + 1])}")
                except ImportError:
                    break
            if value is None and i < len(attributes) - 1:
                break
            obj = value
        else:
            return True
    return False


def unresolved(text: str, doc_dir: Path) -> list[str]:
    """The references of `text` that do not resolve (files relative to `doc_dir`, the repository or the package)."""
    failed = []
    for reference in doc_references(text):
        kind, target = reference.split(":", 1)
        if kind == "file" and not _resolves_file(target, doc_dir):
            failed.append(reference)
        elif kind == "name" and not _resolves_name(target):
            failed.append(reference)
        elif kind == "module" and importlib.util.find_spec(target) is None:
            failed.append(reference)
        elif kind == "link" and not (doc_dir / target).exists():
            failed.append(reference)
    return failed


@pytest.mark.parametrize("doc", DOCS)
def test_doc_references_resolve(doc):
    """Every backticked reference in the doc, outside fenced code blocks, names something that exists.

    What counts as a reference (everything else in backticks, math like `x.shape` or `dy @ W`, options, output
    files such as `<gpu>.json` or `tune.md`, is left alone):
    - a path with a slash whose first folder is one of the repository's (`benchmarks/README.md`, `.ci/run`) or of the
      package's, as the docs write them (`kernels/policy.py`), also as a word of a command
      (`python examples/quickstart.py`): it exists relative to the repository, the doc's folder or the package; `*`
      globs must match something; placeholders (`<gpu>`), `~` and `$` are skipped;
    - a bare `name.py` / `name.sh`: a tracked file of that name exists somewhere in the repository;
    - the whole span a dotted name, optionally called (`a.b`, `a.b(...)`), starting with `relora_kernels`, `rk`
      (the package), `benchmarks`, `examples`, `tests`, the stem of a module of the package or the benchmarks
      (`policy.predicted_engine`; not where an installed package has that name), or a name the package exports
      (`LoRALinear.from_linear`): it imports and getattr-resolves (a dataclass field or annotated attribute of a
      class counts);
    - the module of a `python -m MODULE` command: it can be found;
    - and, not backticked, the target of a relative markdown link (`[text](examples/README.md#anchor)`): the file
      exists relative to the doc (anchors are not checked).
    """
    path = ROOT / doc
    broken = unresolved(path.read_text(), path.parent)
    assert not broken, f"{doc}: references that do not resolve: {broken}"


def test_a_broken_reference_is_found():
    text = ("`kernels/policy.py` and `rk.lora_linear(x, ...)` and `policy.predicted_engine` and `x.shape` hold;\n"
            "`kernels/no_such.py`, `rk.no_such_name`, `policy.no_such_rule`, `lora_linear.no_such_pass(x)`,\n"
            "`LoRALinear.no_such_method`, `no_such_file.py`, `python -m benchmarks.no_such_tool --x 1` do not;\n"
            "[a link](tests/conftest.py#top) holds, [another](tests/no_such.md) does not, [a URL](https://x.org/y) "
            "is not checked;\n"
            "```bash\npython -m benchmarks.not_checked_in_a_code_block\n```\n")
    assert unresolved(text, ROOT) == [
        "link:tests/no_such.md", "file:kernels/no_such.py", "name:rk.no_such_name", "name:policy.no_such_rule",
        "name:lora_linear.no_such_pass", "name:LoRALinear.no_such_method", "file:no_such_file.py",
        "module:benchmarks.no_such_tool"]
