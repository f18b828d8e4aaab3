"""What the package says it is and where it installs: the license and metadata in pyproject.toml, the sdist's
contents, the reference path without triton (which has wheels for Linux only), and the integration's import error
without its extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="the standard library's TOML reader is Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str) -> Requirement:
    (found,) = [r for r in map(Requirement, PROJECT["dependencies"]) if r.name == name]
    return found


def test_license_is_the_apache_spdx_string_and_the_file_ships():
    assert PROJECT["license"] == "Apache-2.0"  # the SPDX string; the table form is deprecated
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    # A License classifier beside an SPDX expression is an error for setuptools (PEP 639).
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    assert PROJECT["keywords"] and PROJECT["urls"]


def test_triton_is_required_only_where_it_has_wheels():
    triton = requirement("triton")
    assert triton.specifier.contains("3.4.0") and not triton.specifier.contains("3.3.1")
    linux = {"sys_platform": "linux", "platform_system": "Linux"}
    for machine in ("x86_64", "aarch64"):
        assert triton.marker.evaluate({**default_environment(), **linux, "platform_machine": machine})
    for platform, machine in (("darwin", "arm64"), ("darwin", "x86_64"), ("win32", "AMD64"), ("linux", "ppc64le")):
        assert not triton.marker.evaluate({**default_environment(), "sys_platform": platform,
                                           "platform_machine": machine})
    assert requirement("torch").marker is None  # everything else installs everywhere


def test_the_sdist_carries_the_tests_and_what_they_import():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for folder in ("tests", "examples", "benchmarks"):  # conftest puts examples/ on sys.path; tests import helpers
        assert f"{folder}" in manifest and (ROOT / folder).is_dir()
    assert (ROOT / "tests" / "conftest.py").is_file() and (ROOT / "tests" / "helpers.py").is_file()


def run_without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `module` (and its submodules) cannot be imported, as if it were not
    installed."""
    blocker = textwrap.dedent(f"""
        import importlib.abc, sys
        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {module!r} or name.startswith({module!r} + "."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Missing())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    env.pop("RELORA_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a subprocess
def test_without_triton_the_package_runs_the_reference_and_a_forced_triton_backend_says_so():
    out = run_without("triton", """
        import warnings
        import torch
        import relora_kernels as rk
        from relora_kernels import _backend, reference

        torch.manual_seed(0)
        x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        # The reference, bit for bit: the kernels (interpreted here) would round differently.
        assert torch.equal(rk.lora_linear(x, w, a, b, 0.5), reference.lora_linear(x, w, a, b, 0.5))
        model = rk.apply_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], r=2)
        model(x).sum().backward()
        assert model[0].lora_B.grad is not None
        w2 = w.clone()
        rk.merge_and_reinit_(w2, a.clone(), b.clone(), 0.5, seed=0)
        assert torch.equal(w2, reference.merged_weight(w, a, b, 0.5))
        # auto on a CUDA device: the reference, with a warning rather than silently.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _backend.use_triton(torch.device("cuda")) is False
        assert any("triton is not installed" in str(w.message) for w in caught), caught
        try:
            with rk.settings(backend="triton"):
                rk.lora_linear(x, w, a, b)
        except RuntimeError as e:
            print("ERROR:", e)
        import sys
        print("LOADED:", sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")))
    """)
    assert out.returncode == 0, out.stderr
    assert "LOADED: []" in out.stdout
    assert "ERROR: the backend setting is triton (RELORA_KERNELS_BACKEND=triton) but triton is not installed" in (
        out.stdout)


@pytest.mark.slow  # a subprocess
def test_the_transformers_integration_without_transformers_names_the_extra():
    out = run_without("transformers", """
        import relora_kernels  # the package itself never needs transformers
        try:
            import relora_kernels.integrations.transformers
        except ImportError as e:
            print("ERROR:", e)
    """)
    assert out.returncode == 0, out.stderr
    assert "ERROR: relora_kernels.integrations.transformers needs Hugging Face transformers" in out.stdout
    assert "pip install 'relora-kernels[transformers]'" in out.stdout
