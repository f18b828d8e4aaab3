"""The sweep as a long job on a borrowed GPU: most important runs first, the file rewritten after every run, a time
budget, and --resume to finish a file later. The measurements are replaced by a stand-in (these tests are about
bookkeeping); test_bench_lora.py runs the real cases.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import relora_kernels as rk

from . import cases, e2e, harness, report, sweep

SUBSET = ["--smoke", "--ops", "merge_and_reinit,pretrain"]  # 4 merge + 4 pretrain runs


@pytest.fixture
def measured(monkeypatch):
    """Replace measure_case by a stand-in that records which runs it was asked for."""
    calls = []

    def fake_measure(case, provider, device, smoke):
        calls.append(sweep._planned_key(case, provider))
        return {**case.row(), "provider": provider, **sweep.NO_MEASUREMENT, "status": "ok"}

    monkeypatch.setattr(sweep, "measure_case", fake_measure)
    return calls


def _read(path):
    return json.loads(path.read_text())


def test_default_grid_runs_the_headline_first_and_everything_once():
    pairs = sweep.plan(sweep.parse_args(["--list"]))
    keys = [sweep._planned_key(case, provider) for case, provider in pairs]
    assert len(set(keys)) == len(keys), "two runs share a key: --resume would confuse them"
    assert pairs[0][0] == cases.HEADLINE
    first_pretrain = next(i for i, (case, _) in enumerate(pairs) if isinstance(case, e2e.PretrainCase))
    grids = {"lora_linear": cases.lora_grid, "merge_and_reinit": cases.merge_grid, "lora_launches": cases.launch_grid}
    quick = {case for grid in grids.values() for case in grid("quick")}
    assert all(case in quick for case, _ in pairs[:first_pretrain])
    assert not any(case in quick for case, _ in pairs[first_pretrain + len(e2e.CONFIGS):])
    every = {(case, provider) for op, grid in grids.items() for case in grid("default")
             for provider in cases.providers(op)}
    every |= {(e2e.case(False), config) for config in e2e.CONFIGS}
    assert set(pairs) == every


def test_an_interrupted_sweep_keeps_the_rows_it_measured(measured, monkeypatch, tmp_path):
    real = sweep.measure_case

    def third_run_interrupted(case, provider, device, smoke):
        if len(measured) == 2:
            raise KeyboardInterrupt
        return real(case, provider, device, smoke)

    monkeypatch.setattr(sweep, "measure_case", third_run_interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([*SUBSET, "--out", str(tmp_path)])
    results = _read(tmp_path / "cpu-smoke.json")
    assert [row["provider"] for row in results["rows"]] == ["eager", "fused"]
    assert (results["planned"], results["not_run"]) == (8, 6)
    assert not list(tmp_path.glob("*.partial"))


def test_a_spent_budget_starts_no_run_and_the_file_says_so(measured, tmp_path):
    assert sweep.main([*SUBSET, "--out", str(tmp_path), "--budget-s", "0"]) == 0
    results = _read(tmp_path / "cpu-smoke.json")
    assert (measured, results["rows"], results["planned"], results["not_run"]) == ([], [], 8, 8)
    assert "incomplete: 8 of 8 planned runs were not run" in report.markdown(results)


def test_resume_runs_only_what_the_file_lacks(measured, tmp_path):
    sweep.main(["--smoke", "--ops", "pretrain", "--providers", "full_eager,lora_eager", "--out", str(tmp_path)])
    path = tmp_path / "cpu-smoke.json"
    earlier = _read(path)
    earlier["rows"][1]["status"] = "error"  # an error is run again
    path.write_text(json.dumps(earlier))
    measured.clear()

    assert sweep.main([*SUBSET, "--out", str(tmp_path), "--resume", str(path)]) == 0
    results = _read(path)
    assert [key[1] for key in measured] == ["eager", "fused", "fused_fp8", "fused_fp8_cpu_master", "lora_eager",
                                           "relora_fused", "relora_fused_compile"]
    assert [row["provider"] for row in results["rows"]] == [*cases.MERGE_PROVIDERS, *e2e.CONFIGS]  # plan order
    assert (results["planned"], results["not_run"], results["date"]) == (8, 0, earlier["date"])
    assert len(results["resumed"]) == 1


@pytest.mark.parametrize("field", ["commit", "device", "torch"])
def test_resume_refuses_a_file_measured_under_other_conditions(field, measured, tmp_path):
    sweep.main([*SUBSET, "--out", str(tmp_path), "--budget-s", "0"])
    path = tmp_path / "cpu-smoke.json"
    path.write_text(json.dumps({**_read(path), field: "something else"}))
    with pytest.raises(SystemExit, match=f"its {field} is 'something else'"):
        sweep.main([*SUBSET, "--out", str(tmp_path), "--resume", str(path)])


def test_resume_names_an_unreadable_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not a readable result file"):
        sweep.main([*SUBSET, "--out", str(tmp_path), "--resume", str(tmp_path / "bad.json")])


def test_budget_must_be_a_non_negative_number(capsys):
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--budget-s", bad])
        assert "--budget-s" in capsys.readouterr().err


def test_first_contact_plan_runs_the_headline_comparison_first_and_the_launches_last():
    pairs = sweep.plan(sweep.parse_args(["--list", "--first"]))
    lora = [(case, provider) for case, provider in pairs if isinstance(case, cases.LoraCase)]
    engines = ("fused_triton", "fused_cublas", "fused")  # both engines and the automatic choice, side by side
    # then the same three with an FP8 frozen weight
    assert lora[:8] == [(cases.HEADLINE, p) for p in ("floor", "eager", *engines, *cases.FP8_PROVIDERS)]
    # torch.compile's runs (a minute of compiling each) after every other run of the first part, the headline's first
    compiles = [i for i, (_, provider) in enumerate(pairs) if provider == "compile"]
    others = [i for i, (case, provider) in enumerate(pairs) if provider != "compile"
              and not isinstance(case, cases.LaunchCase)]
    assert compiles and min(compiles) > max(others) and pairs[compiles[0]][0] == cases.HEADLINE
    headline_p0 = dataclasses.replace(cases.HEADLINE, p=0.0)
    assert {p for case, p in lora if case == headline_p0} == {"floor", "eager", "compile", *engines,
                                                              *cases.FP8_PROVIDERS}
    shapes = {(case.M, case.K, case.N, case.p) for case, _ in lora}
    assert shapes == {(8192, 4096, 4096, 0.1), (8192, 4096, 4096, 0.0), (2048, 768, 3072, 0.1),
                      (8192, 4096, 14336, 0.1)}
    for shape in shapes:  # the FP8 rows at every shape, beside the bf16 op and eager they are held against
        assert {p for case, p in lora if (case.M, case.K, case.N, case.p) == shape} >= {"eager", "fused",
                                                                                        *cases.FP8_PROVIDERS}
    assert [p for case, p in pairs if isinstance(case, cases.MergeCase)] == ["eager", "fused", "fused_fp8",
                                                                                  "fused_fp8_cpu_master"]
    assert {case.mode for case, _ in lora} == {"fwd+bwd"} and {case.dtype for case, _ in lora} == {"bf16"}
    ops = [case.row()["op"] for case, provider in pairs if provider != "compile"]
    assert ops == sorted(ops, key=["lora_linear", "merge_and_reinit", "pretrain", "lora_launches"].index)
    assert [p for case, p in pairs if isinstance(case, e2e.PretrainCase)] == ["full_eager", "lora_eager",
                                                                             "relora_fused"]
    launches = [p for case, p in pairs if isinstance(case, cases.LaunchCase)]
    assert launches == list(cases.LAUNCH_PROVIDERS)  # both engines' launches, at the headline shape
    assert {"shrink_expand", "grad_ab_start", "addmm_fwd", "addmm_dx", "forward_matmul"} <= set(launches)


def test_first_contact_on_the_smoke_shapes_runs_the_same_providers():
    def providers(argv):
        return {(case.row()["op"], provider) for case, provider in sweep.plan(sweep.parse_args(argv))}

    assert providers(["--list", "--first", "--smoke"]) == providers(["--list", "--first"])


def test_the_sweep_sets_each_fused_providers_engine_and_records_the_choice(monkeypatch, tmp_path):
    seen = []
    real = cases.build

    def build(provider, case, device):
        seen.append((provider, rk.current_settings().engine))
        return real(provider, case, device)

    monkeypatch.setattr(cases, "build", build)
    providers = "eager,fused_triton,fused_cublas,fused"
    argv = ["--smoke", "--ops", "lora_linear", "--modes", "fwd+bwd", "--providers", providers, "--out", str(tmp_path)]
    assert sweep.main(argv) == 0
    assert seen[:4] == [("eager", "auto"), ("fused_triton", "triton"), ("fused_cublas", "cublas"), ("fused", "auto")]
    assert rk.current_settings().engine == "auto"  # restored after each run
    rows = {row["provider"]: row for row in _read(tmp_path / "cpu-smoke.json")["rows"]}
    assert (rows["fused_triton"]["engine_fwd"], rows["fused_cublas"]["engine_dx"]) == ("triton", "cublas")
    assert rows["fused"]["engine_fwd"] == "cublas"  # the interpreter's fp32: the rule's cuBLAS
    assert "engine_fwd" not in rows["eager"]


def test_a_log_gets_one_plain_line_per_run_not_bar_frames(measured, tmp_path, capsys):
    assert sweep.main([*SUBSET, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # pytest's captured stderr is no terminal
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("sweep (smoke) [")]
    assert len(lines) == 8 and lines[0].startswith("sweep (smoke) [1/8] ok: eager tiny merge")
    assert lines[-1].startswith("sweep (smoke) [8/8] ok: relora_fused_compile pretrain smoke-tiny")


def test_the_fp8_rows_record_their_engines_or_why_they_were_skipped(monkeypatch, tmp_path):
    # The builds run (W quantised, the machine's FP8 support asked), the measurement is a stand-in: the FP8 math runs
    # in test_bench_lora.py. fused_fp8_cublas needs torch._scaled_mm on the CPU (torch 2.13 has it; not every torch).
    from relora_kernels.kernels.passes_fp8 import scaled_mm_support

    monkeypatch.setattr(harness, "measure", lambda fn, device, smoke: dict(sweep.NO_MEASUREMENT))
    providers = ",".join(cases.FP8_PROVIDERS)
    argv = ["--smoke", "--first", "--ops", "lora_linear,merge_and_reinit", "--providers", providers,
            "--out", str(tmp_path)]
    assert sweep.main(argv) == 0
    results = _read(tmp_path / "cpu-smoke.json")
    rows = {(row["op"], row["provider"], row.get("p")): row for row in results["rows"]}
    assert set(rows) == {*(("lora_linear", p, q) for p in cases.FP8_PROVIDERS for q in (0.0, 0.1)),
                         ("merge_and_reinit", "fused_fp8", None)}
    problem = scaled_mm_support("cpu", None, torch.float32)
    for (op, provider, _), row in rows.items():
        if provider == "fused_fp8_cublas" and problem is not None:
            assert row["status"] == "skipped" and row["reason"] == problem and "torch" in row["reason"]
            continue
        assert row["status"] == "ok", row
        if op == "lora_linear":  # the smoke shape's reductions (48, 80) are below the rule's 1536: Triton for auto
            engine = "cublas" if provider == "fused_fp8_cublas" else "triton"
            assert (row["engine_fwd"], row["engine_dx"]) == (engine, engine)
    text = report.markdown(results)
    assert "## lora_linear with an FP8 frozen weight" in text and "| tiny | fwd+bwd | 64 | 48->80 |" in text


class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_a_terminal_gets_the_bar_and_only_the_problems_as_lines():
    terminal = _Terminal()
    progress = harness.Progress(3, "sweep", "run", stream=terminal)
    progress.completed("ok: first")
    progress.completed("error: second: boom", problem=True)
    progress.completed("ok: third")
    progress.close()
    assert "\r" in terminal.text and "3/3" in terminal.text
    assert "error: second: boom\n" in terminal.text and "ok: first" not in terminal.text
