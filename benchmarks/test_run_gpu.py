"""benchmarks/run_gpu.sh's folder check (harness.check_outputs): the folder's limits (files, their sizes and names),
and whether every part left its file. The whole script runs in CI as `RUN_GPU_SMOKE=1 bash benchmarks/run_gpu.sh
DIR` (.ci/run)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from . import cases, harness, sweep

ROOT = Path(__file__).resolve().parent.parent


def _run_folder(path, **extra):
    """A folder as a complete smoke run leaves it, plus `extra` files (name: text)."""
    files = {
        "cpu-smoke.json": json.dumps({"rows": [{"op": "lora_linear"}]}),
        "cpu-smoke.md": "# Benchmark results\n",
        "gpu_build.md": "| kernel |\n",
        "pytest_gpu.txt": "....\n4 passed, 74 skipped in 1.16s\n",
        "run_gpu.json": json.dumps({"parts": [{"part": "build", "seconds": 5, "exit_code": 0}]}),
        "run_gpu.log": "run_gpu.sh: cpu-smoke\n",
        **extra,
    }
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_complete_folder_passes(tmp_path):
    assert harness.check_outputs(_run_folder(tmp_path)) == []
    assert harness.main(["--check-outputs", str(tmp_path)]) == 0


@pytest.mark.parametrize(("change", "problem"), [
    ({"a.png": "", "b.png": "", "c.png": ""}, "9 files, more than the 8"),
    ({"cpu-smoke.json": "{"}, "cpu-smoke.json: not JSON"),
    ({"run_gpu.json": json.dumps({"parts": None})}, "run_gpu.json: no 'parts'"),
    ({"cpu-smoke.json": json.dumps({"rows": []})}, "cpu-smoke.json: no 'rows', or none in it"),
    ({"pytest_gpu.txt": "....\n!!! KeyboardInterrupt\n"}, "not pytest's summary"),
    ({"h200 log.txt": ""}, "not a plain file name"),
    ({"other.json": json.dumps({"rows": []})}, "expected one sweep result file"),
])
def test_a_folder_past_its_limits_or_incomplete_fails(tmp_path, change, problem):
    problems = harness.check_outputs(_run_folder(tmp_path, **change))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("name", [*harness.RUN_FILES, "cpu-smoke.md"])
def test_a_missing_part_is_named(tmp_path, name):
    (_run_folder(tmp_path) / name).unlink()
    assert any(p.startswith(name) and "missing" in p for p in harness.check_outputs(tmp_path))


def test_a_skipped_part_needs_no_file_but_a_run_part_does(tmp_path):
    record = {"parts": [{"part": "tests", "skipped": True}, {"part": "build", "seconds": 3, "exit_code": 0}]}
    folder = _run_folder(tmp_path, **{"run_gpu.json": json.dumps(record)})
    for name in ("pytest_gpu.txt", "gpu_build.md"):
        (folder / name).unlink()
    assert harness.check_outputs(folder) == ["gpu_build.md: missing"]


def test_a_file_over_the_size_limit_or_a_subfolder_fails(tmp_path):
    (_run_folder(tmp_path) / "deeper").mkdir()
    problems = harness.check_outputs(tmp_path, max_file_mib=10 / 2**20)
    assert any("cpu-smoke.json" in p and "over 10" in p for p in problems)
    assert "deeper: a folder (run_gpu.sh writes files only)" in problems
    assert harness.main(["--check-outputs", str(tmp_path)]) == 1


def test_the_limits_are_options_with_the_defaults_8_files_and_16_mib(tmp_path, capsys):
    _run_folder(tmp_path)
    assert (harness.MAX_FILES, harness.MAX_FILE_MIB) == (8, 16)
    assert harness.main(["--check-outputs", str(tmp_path)]) == 0
    assert harness.main(["--check-outputs", str(tmp_path), "--max-files", "5"]) == 1
    assert "6 files, more than the 5 allowed" in capsys.readouterr().err
    assert harness.main(["--check-outputs", str(tmp_path), "--max-file-mib", str(20 / 2**20)]) == 1
    with pytest.raises(SystemExit):
        harness.main(["--check-outputs", str(tmp_path), "--max-files", "0"])


@pytest.mark.parametrize("smoke", [False, True])
def test_the_sweep_part_times_the_fp8_rows_first(smoke):
    # The sweep part (before the tests, with most of the budget) runs the FP8 providers at every first-contact shape
    # beside eager and the bf16 op, and the FP8 layer's restart; on the smoke shapes too (CI's smoke run).
    text = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
    ops = re.search(r"part_sweep\(\) \{.*?--ops (\S+)", text, re.DOTALL).group(1)
    pairs = sweep.plan(sweep.parse_args(["--list", "--first", "--ops", ops, *(["--smoke"] if smoke else [])]))
    lora = [(case, provider) for case, provider in pairs if isinstance(case, cases.LoraCase)]
    assert {case for case, _ in lora} == {case for case in cases.lora_grid("smoke" if smoke else "first")
                                          if case.mode == "fwd+bwd"}
    for shape in {case for case, _ in lora}:
        assert {p for case, p in lora if case == shape} >= {"eager", "fused", *cases.FP8_PROVIDERS}, shape
    assert ("merge_and_reinit", "fused_fp8") in {(case.row()["op"], p) for case, p in pairs}


@pytest.mark.slow
def test_run_gpu_refuses_bad_options_before_running_anything(tmp_path):
    script = ROOT / "benchmarks" / "run_gpu.sh"
    for args, message in ((["--max-files", "0"], "--max-files must be"), (["--budget-s", "9.5"], "--budget-s must"),
                          (["--max-file-mib", "x"], "--max-file-mib must"), (["--bogus"], "unknown option --bogus"),
                          (["--skip", "host,bogus"], "no part 'bogus'"), (["--skip", "check"], "check always runs"),
                          ([str(tmp_path / "a"), str(tmp_path / "b")], "one folder only")):
        run = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert not any(tmp_path.iterdir()), args  # nothing written
    text = script.read_text()
    assert 'max_files="${RUN_MAX_FILES:-8}"' in text and 'max_file_mib="${RUN_MAX_FILE_MIB:-16}"' in text


@pytest.mark.slow
def test_the_project_speaks_only_of_itself():
    # Its docs and comments describe an output folder and a time budget, not the machinery that lends a GPU, nor
    # notes kept elsewhere (the words are split here so that this file does not match).
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to search")
    words = ["\\$" + "OUT", "device" + " tool", "le" + "ase", "the" + " brief", "/wo" + "rk/"]
    # A GPU run's own output, kept verbatim under results/ (a third-party warning asking politely), is not searched.
    recorded = [":(exclude,glob)benchmarks/results/*/*." + ext for ext in ("txt", "log")]
    found = subprocess.run(["git", "grep", "-nE", "|".join(words), "--", ".", *recorded], cwd=ROOT,
                           capture_output=True, text=True)
    assert found.returncode == 1 and not found.stdout, found.stdout
