"""report.py on a synthetic result file: tables, plots, headline and goal checks.

The numbers below are invented to exercise the report (device "FAKE-GPU for tests"); they live only in pytest's
temporary folder and never in benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from . import cases, report, time_model

FAKE_MS = {"floor": 1.0, "native_floor": 0.98, "eager": 1.6, "compile": 1.3, "native": 1.25, "fused_triton": 1.2,
           "fused_cublas": 1.05, "fused": 1.05, "fused_compile": 1.06}
# The FP8 providers at the headline fwd+bwd: fused_fp8 2.16x eager and 1.42x fused (both goals met), its Triton engine
# short of both (1.88x, 1.24x).
FAKE_FP8_MS = {"fused_fp8_triton": 0.85, "fused_fp8_cublas": 0.74, "fused_fp8": 0.74}
COPY_GBPS = 3000.0


def _lora_rows(case, times, engines=None):
    engines = engines or {"fused": {"engine_fwd": "cublas", "engine_dx": "triton", "tile_fwd": None,
                                    "tile_dx": "128x128x64 g8 w8 s4"},
                          "fused_fp8": {"engine_fwd": "cublas", "engine_dx": "cublas"}}
    return [{**case.row(), "provider": provider, "median_ms": ms, "p20_ms": ms * 0.99, "p80_ms": ms * 1.01,
             "peak_mem_mb": 100.0, **cases.metrics(case, provider, ms), **engines.get(provider, {}), "status": "ok"}
            for provider, ms in times.items()]


def fake_results(smoke=False) -> dict:
    rows = []
    for mode in cases.MODES:
        rows += _lora_rows(dataclasses.replace(cases.HEADLINE, mode=mode),
                           {**FAKE_MS, **(FAKE_FP8_MS if mode == "fwd+bwd" else {})})
    # One shape where fused is behind compile: the "ahead everywhere" goal must catch it.
    small = dataclasses.replace(cases.HEADLINE, K=768, N=3072, layer="gpt2-124m.fc")
    small_ms = {provider: ms for provider, ms in FAKE_MS.items() if provider != "native"}
    rows += _lora_rows(small, {**small_ms, "fused": 0.5, "fused_triton": 0.5, "fused_cublas": 0.55, "compile": 0.4})
    # fused_fp8 behind the bf16 op here, its two frozen GEMMs on different engines (no prediction for that)
    rows += _lora_rows(small, {"fused_fp8": 0.55}, {"fused_fp8": {"engine_fwd": "triton", "engine_dx": "cublas"}})
    rows.append({**small.row(), "provider": "native", "median_ms": None, "p20_ms": None, "p80_ms": None,
                 "peak_mem_mb": None, "status": "skipped", "reason": "no CUDA device"})
    square = cases.merge_grid("quick")[0]
    for provider, fraction in (("eager", 0.3), ("fused", 0.9), ("fused_fp8", 0.8)):
        moved = cases.merge_bytes(square, provider)
        ms = moved / (fraction * COPY_GBPS * 1e9) * 1e3
        rows.append({**square.row(), "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "peak_mem_mb": 0.0, **cases.metrics(square, provider, ms), "status": "ok"})
    for config, ms in (("full_eager", 100.0), ("lora_eager", 90.0), ("relora_fused", 80.0)):
        rows.append({"op": "pretrain", "provider": config, "mode": "train_step", "model": "gpt2-124m", "M": 8192,
                     "r": 128, "p": 0.1, "dtype": "bf16", "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "peak_mem_mb": 5000.0, "tokens_per_s": 8192 / (ms * 1e-3), "status": "ok"})
    if smoke:
        rows = [{**row, "median_ms": None, "p20_ms": None, "p80_ms": None} for row in rows]
    return {"device": "FAKE-GPU for tests", "smoke": smoke, "torch": "0.0", "triton": "0.0", "cuda": "0.0",
            "commit": "0" * 40, "date": "2000-01-01T00:00:00+00:00", "copy_gbps": None if smoke else COPY_GBPS,
            "rows": rows}


@pytest.fixture
def fake_file(tmp_path):
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(fake_results()))
    return path


def test_goals_are_checked():
    met = {goal.name.split(" (")[0]: goal for goal in report.goals(fake_results())}
    assert met["fused >= 1.40x eager"].met is True  # 1.6 / 1.05 = 1.52
    assert met["fused <= 1.10x floor"].met is True  # 1.05
    assert met["fused_cublas <= 1.10x floor"].met is True and met["fused_cublas >= 1.40x eager"].met is True
    assert met["fused_triton <= 1.10x floor"].met is False  # 1.2
    assert met["fused_triton >= 1.40x eager"].met is False and "1.33x" in met["fused_triton >= 1.40x eager"].detail
    assert met["fused never slower than eager at any shape"].met is True
    ahead = met["fused ahead of compile and native at every shape"]
    assert ahead.met is False and "gpt2-124m.fc" in ahead.detail and "vs compile" in ahead.detail
    assert "6/7 comparisons won" in ahead.detail  # 3 headline modes x 2 rivals, then gpt2 fc vs compile only
    assert met["merge+reinit >= 75% of copy bandwidth"].met is True  # 90%
    assert met["fused_fp8 >= 2.00x eager"].met is True and "2.16x" in met["fused_fp8 >= 2.00x eager"].detail
    assert met["fused_fp8 >= 1.40x the bf16 op"].met is True  # 1.05 / 0.74 = 1.42
    assert met["fused_fp8_cublas >= 2.00x eager"].met is True
    assert met["fused_fp8_triton >= 2.00x eager"].met is False and met["fused_fp8_triton >= 1.40x the bf16 op"].met \
        is False  # 1.88x, 1.24x
    slower = met["fused_fp8 never slower than the bf16 op"]
    assert slower.met is False and "1/2 comparisons won; behind at gpt2-124m.fc" in slower.detail


@pytest.mark.parametrize("fp8_rows", ["none", "skipped"])
def test_fp8_goals_are_not_measured_without_fp8_rows(fp8_rows):
    # No FP8 provider in the file, or each skipped (a GPU below sm_89): not measured, never "not met".
    results = fake_results()
    if fp8_rows == "none":
        results["rows"] = [row for row in results["rows"] if row["provider"] not in cases.FP8_PROVIDERS]
    else:
        results["rows"] = [{**row, "median_ms": None, "status": "skipped", "reason": "sm_80"}
                           if row["provider"] in cases.FP8_PROVIDERS else row for row in results["rows"]]
    fp8 = [goal for goal in report.goals(results) if "fp8" in goal.name]
    assert len(fp8) == 7 and all(goal.met is None for goal in fp8), [goal.line() for goal in fp8]
    if fp8_rows == "skipped":
        assert "| fused_fp8 | cublas/cublas | skipped |" in report.markdown(results)


def test_fp8_table_sets_each_measurement_beside_its_prediction():
    text = report.markdown(fake_results())
    section = text[text.index("## lora_linear with an FP8 frozen weight"):text.index("## merge_and_reinit")]
    assert "PREDICTED" in section and "not measurements" in section
    rows = {tuple(line.split(" | ")[7:9]): line.rstrip(" |").split(" | ")
            for line in section.splitlines() if line.startswith("| llama") or line.startswith("| gpt2")}
    ratios = time_model.fp8_ratios(8192, 4096, 4096, 16, dropout=True)
    for provider, engine, ms in (("fused_fp8_cublas", "fp8_cublas", 0.74), ("fused_fp8_triton", "fp8_triton", 0.85),
                                 ("fused_fp8", "fp8_cublas", 0.74)):  # fused_fp8 ran cuBLAS on both GEMMs
        row = next(cells for (name, _), cells in rows.items() if name == provider and cells[0] == "| llama-7b.qkvo")
        assert row[9:] == [f"{ms:g}", ratios[f"{engine}_ms"].span(3), f"{1.6 / ms:.3g}",
                           ratios[f"{engine}_vs_eager"].span(2), f"{1.05 / ms:.3g}",
                           ratios[f"{engine}_vs_bf16"].span(2)]
    mixed = next(cells for cells in rows.values() if cells[0] == "| gpt2-124m.fc")
    assert mixed[8:] == ["triton/cublas", "0.55", "—", f"{1.6 / 0.55:.3g}", "—", f"{0.5 / 0.55:.3g}", "—"]


def test_merge_table_sets_the_fp8_restart_beside_the_bf16_one():
    text = report.markdown(fake_results())
    line = next(line for line in text[text.index("## merge_and_reinit"):].splitlines() if line.startswith("| llama"))
    cells = line.rstrip(" |").split(" | ")
    square = cases.merge_grid("quick")[0]
    fp8_ms, bf16_ms = (cases.merge_bytes(square, q) / (f * COPY_GBPS * 1e9) * 1e3 for q, f in (("fused_fp8", 0.8),
                                                                                              ("fused", 0.9)))
    assert cells[9] == f"{0.8 * COPY_GBPS:.3g}" and cells[11] == f"{fp8_ms / bf16_ms:.3g}"


def test_goals_fail_when_fused_is_slow():
    results = fake_results()
    for row in results["rows"]:
        if row["op"] == "lora_linear" and row["provider"] == "fused":
            row["median_ms"] = 1.5
    met = {goal.name.split(" (")[0]: goal.met for goal in report.goals(results)}
    assert met["fused >= 1.40x eager"] is False and met["fused <= 1.10x floor"] is False
    assert met["fused_cublas >= 1.40x eager"] is True  # each engine is judged on its own row
    for row in results["rows"]:
        if row["op"] == "lora_linear" and row["provider"] == "fused":
            row["median_ms"] = 1.7
    met = {goal.name.split(" (")[0]: goal for goal in report.goals(results)}
    assert met["fused never slower than eager at any shape"].met is False
    assert "0/4 comparisons won" in met["fused never slower than eager at any shape"].detail


def test_report_writes_table_plots_and_goals(fake_file, capsys):
    assert report.main([str(fake_file)]) == 0
    out = capsys.readouterr().out
    text = fake_file.with_suffix(".md").read_text()
    assert "# Benchmark results: FAKE-GPU for tests" in text
    # The providers' ms, then each engine's and the automatic choice's time / floor and speedup over eager, the
    # automatic choice's engines per pass and its TFLOP/s.
    assert ("| llama-7b.qkvo | fwd+bwd | 8192 | 4096->4096 | 16 | 0.1 | bf16 | 1 | 0.98 | 1.6 | 1.3 | 1.25 | 1.2 | "
            "1.05 | 1.05 | 0.85 | 0.74 | 0.74 | 1.06 | 1.2 | 1.33 | 1.05 | 1.52 | 1.05 | 1.52 | "
            "cublas/triton |") in text
    assert "| fused_triton / floor | fused_triton vs eager | fused_cublas / floor |" in text
    assert "| relora_fused | gpt2-124m | 8192 |" in text and "## Not measured" in text
    # The tile each Triton pass ran (none for a cuBLAS pass)
    assert ("| llama-7b.qkvo | fwd+bwd | 8192 | 4096->4096 | 16 | 0.1 | bf16 | fused | — | 128x128x64 g8 w8 s4 |"
            in text)
    for suffix in ("speedup", "vs_floor"):
        png = fake_file.with_name(f"fake_{suffix}.png")
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "NOT MET      fused ahead of compile and native" in out


def test_headline_names_the_machine_and_the_case(fake_file, capsys):
    assert report.main([str(fake_file), "--headline"]) == 0
    out = capsys.readouterr().out
    assert "FAKE-GPU for tests" in out and "8192 tokens x 4096 -> 4096, r = 16, dropout 0.1, bf16" in out
    assert "| `fused` | 1.05 | 1.05 | 1.05 | 1.52 | 1.05 | 100 |" in out


def test_smoke_file_gives_no_headline_and_no_plots(tmp_path, capsys):
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(fake_results(smoke=True)))
    assert report.main([str(path), "--headline"]) == 2
    assert "smoke run" in capsys.readouterr().err
    with pytest.raises(report.SmokeResults):
        report.plots(fake_results(smoke=True), tmp_path / "smoke")
    assert report.main([str(path)]) == 0  # the markdown listing of what ran is still written
    assert "nothing was timed" in path.with_suffix(".md").read_text()


def test_not_a_result_file(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    assert report.main([str(path)]) == 2
    assert "missing device" in capsys.readouterr().err


def test_launch_breakdown_holds_each_launch_against_its_yardstick():
    case = cases.launch_grid("quick")[0]
    # Invented times: the two GEMMs at 0.5 ms with cuBLAS at 0.45; x copied at 2.0 TB/s, the shrink at half that;
    # the cuBLAS engine's addmm_ calls at 0.46, its Triton launches at 0.03 and 0.06.
    copy_ms = cases.launch_work(case, "copy_x")[1] / 2.0e12 * 1e3
    shrink_ms = cases.launch_work(case, "shrink")[1] / 1.0e12 * 1e3
    # With FP8: the cuBLAS FP8 GEMMs at 0.25 ms, the Triton FP8 GEMMs at 0.3, its quantising launches at 0.04, 0.07.
    times = {"shrink": shrink_ms, "forward_matmul": 0.5, "grad_ab": 0.05, "input_grad": 0.5, "shrink_expand": 0.03,
             "addmm_fwd": 0.46, "grad_ab_start": 0.06, "addmm_dx": 0.46, "fp8_shrink_quantize": 0.04,
             "fp8_forward_matmul": 0.3, "fp8_grad_ab_quantize": 0.07, "fp8_input_grad": 0.3,
             "fp8_scaled_mm_fwd": 0.25, "fp8_scaled_mm_dx": 0.25, "fp8_scaled_mm_fwd_fast_accum": 0.2,
             "fp8_scaled_mm_fwd_tensorwise": 0.15, "floor_fwd": 0.45, "floor_bwd": 0.45, "copy_x": copy_ms}
    rows = [{**case.row(), "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_mb": 0.0,
             **cases.metrics(case, provider, ms), "status": "ok"} for provider, ms in times.items()]
    text = report.markdown({**fake_results(), "rows": rows})
    lines = [line.rstrip(" |").split(" | ") for line in text.splitlines() if line.startswith("| llama")]
    table = {line[7]: line for line in lines if len(line) == 12}
    assert table["forward_matmul"][6] == "triton" and table["addmm_dx"][6] == "cublas"
    assert float(table["forward_matmul"][11]) == pytest.approx(0.5 / 0.45, rel=5e-3)
    assert float(table["addmm_fwd"][11]) == pytest.approx(0.46 / 0.45, rel=5e-3)
    assert float(table["shrink"][11]) == pytest.approx(0.5, rel=5e-3)  # half the copy's GB/s
    expand_gbps = cases.launch_work(case, "shrink_expand")[1] / 0.03e-3 / 1e9
    assert float(table["shrink_expand"][11]) == pytest.approx(expand_gbps / 2000, rel=5e-3)
    # FP8: the Triton GEMM against the cuBLAS FP8 GEMM, that one against the bf16 GEMM (its rate over bf16's).
    assert table["fp8_forward_matmul"][6] == "fp8_triton" and table["fp8_scaled_mm_dx"][6] == "fp8_cublas"
    assert float(table["fp8_forward_matmul"][11]) == pytest.approx(0.3 / 0.25, rel=5e-3)
    assert float(table["fp8_scaled_mm_fwd"][11]) == pytest.approx(0.25 / 0.45, rel=5e-3)
    # The forward's FP8 GEMM in torch._scaled_mm's other modes, against the engine's own (row-wise, exact accumulation).
    assert table["fp8_scaled_mm_fwd_tensorwise"][6] == "fp8_cublas"
    assert float(table["fp8_scaled_mm_fwd_fast_accum"][11]) == pytest.approx(0.2 / 0.25, rel=5e-3)
    assert float(table["fp8_scaled_mm_fwd_tensorwise"][11]) == pytest.approx(0.15 / 0.25, rel=5e-3)
    quantize_gbps = cases.launch_work(case, "fp8_shrink_quantize")[1] / 0.04e-3 / 1e9
    assert float(table["fp8_shrink_quantize"][11]) == pytest.approx(quantize_gbps / 2000, rel=5e-3)
    (totals,) = [line for line in lines if len(line) == 9]  # each engine's launches over the floor, side by side
    assert float(totals[6]) == pytest.approx((shrink_ms + 0.5 + 0.05 + 0.5) / 0.9, rel=5e-3)  # 3 digits
    assert float(totals[7]) == pytest.approx((0.03 + 0.46 + 0.06 + 0.46) / 0.9, rel=5e-3)
    assert float(totals[8]) == pytest.approx((0.04 + 0.3 + 0.07 + 0.3) / 0.9, rel=5e-3)
