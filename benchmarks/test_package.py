"""Importing `benchmarks` leaves the process as it was; the CLIs say what a CPU smoke run needs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_importing_benchmarks_changes_no_environment_variable():
    code = ("import os; before = dict(os.environ); import benchmarks, benchmarks.cases, benchmarks.sweep; "
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
            "print(sorted(changed))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_INTERPRET", "RELORA_KERNELS"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_cpu_smoke_run_without_the_interpreter_names_the_variable(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    from benchmarks import sweep

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit):
        sweep.main(["--smoke", "--out", "/tmp/never"])
    assert "TRITON_INTERPRET=1 python -m benchmarks.sweep --smoke" in capsys.readouterr().err
