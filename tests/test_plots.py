"""The example's pictures: loss.png (losses, their bias-corrected moving average, the learning rate, restarts and
resumes marked) and the overlay of several runs (examples/plot_runs.py)."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys

import checkpoints
import plot_runs
import plots
import pretrain_gpt2
import pytest
import torch
from test_pretrain_example import read_rows, tiny_args, write_corpus

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPS = sys.float_info.epsilon  # the averages are Python floats: float64


def test_the_moving_average_is_bias_corrected():
    rng = random.Random(0)
    values = [rng.uniform(1.0, 9.0) for _ in range(200)]
    for beta in (0.0, 0.5, 0.9, 0.99):
        got = plots.debiased_ema(values, beta)
        for t in range(1, len(values) + 1):
            # The corrected average is the mean of x_1..x_t under weights (1 - beta) beta^(t - i) / (1 - beta^t),
            # which sum to 1: summed exactly (fsum) here. The recursion rounds t times, each within eps of values
            # below max(values), and the division by 1 - beta^t (>= 1 - beta) magnifies that by at most 1 / (1 - beta).
            weights = [(1 - beta) * beta ** (t - i) for i in range(1, t + 1)]
            exact = math.fsum(w * x for w, x in zip(weights, values, strict=False)) / math.fsum(weights)
            bound = 4 * t * EPS * max(values) / (1 - beta)
            assert abs(got[t - 1] - exact) <= bound, (beta, t)
    # Its first point is the first value itself (an uncorrected average from 0 would start at (1 - beta) x_1), and
    # a constant stays that constant: no lag at the start.
    assert plots.debiased_ema([5.0, 5.0, 5.0], 0.9) == [5.0, 5.0, 5.0]


def test_skipped_steps_are_left_out_of_the_average():
    assert plots.debiased_ema([math.nan, 2.0, None, math.inf, 4.0], 0.5)[:4] == [pytest.approx(x, nan_ok=True)
                                                                               for x in (math.nan, 2.0, 2.0, 2.0)]
    # After x = 2 and x = 4 (t = 2): (0.5 * 0.5 * 2 + 0.5 * 4) / (1 - 0.25) = 2.5 / 0.75.
    assert plots.debiased_ema([math.nan, 2.0, None, math.inf, 4.0], 0.5)[4] == pytest.approx(2.5 / 0.75, rel=4 * EPS)
    with pytest.raises(ValueError, match="beta"):
        plots.debiased_ema([1.0], 1.0)


def test_the_smoothing_scales_with_the_run():
    assert plots.ema_beta(10) == 0.0  # shorter than 40 steps: no smoothing at all
    assert plots.ema_beta(400) == pytest.approx(0.9)
    assert plots.ema_beta(4000) == pytest.approx(0.99)


def test_tick_labels_and_the_loss_axis():
    assert [plots.short_count(x) for x in (0, 950, 100_000, 614_400, 1_500_000, 2e9)] == [
        "0", "950", "100k", "614k", "1.5M", "2B"]
    # A run whose first steps are far above the rest: the axis ends at the 95th percentile (plus 5 % of the span),
    # not at the first loss.
    losses = [8.0, 7.0, 6.0] + [5.0 - i / 100 for i in range(97)]
    bottom, top = plots.loss_range(losses)
    assert plots.quantile(losses, 0.95) < top < 6.0
    assert bottom < min(losses)
    assert plots.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # numpy's default interpolation


def metrics_rows(steps: int = 120, resume_at: int = 40) -> list[dict]:
    """A run's rows as the example writes them: a step-0 eval, a loss falling from 8, restarts every 20 steps after
    a switch to LoRA at step 40, a resume after step 60, a skipped (non-finite) step."""
    rows = [dict(step=0, tokens=0, lr=0.0, train_loss=None, val_loss=8.3, val_ppl=math.exp(8.3))]
    for step in range(1, steps + 1):
        row = dict(step=step, tokens=step * 1024, lr=1e-3 * min(1.0, step / 10) * (step % 20) / 20,
                   train_loss=3.0 + 5.0 * math.exp(-step / 8) + 0.05 * math.sin(step), grad_norm=1.0)
        if step == 77:
            row["train_loss"] = math.nan
        if step == 41:
            row["lora_start"] = True
        if step > 40 and step % 20 == 0:
            row["restart"] = True
        if step == resume_at + 1:
            row["resumed_from"] = resume_at
        if step % 20 == 0:
            row["val_loss"] = row["train_loss"] + 0.1
        rows.append(row)
    return rows


def write_metrics(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_loss_png_has_both_panels_the_marks_and_a_readable_range(tmp_path):
    rows = metrics_rows()
    fig = plots.draw([plots.Run("run", rows)], "run: --mode relora, preset tiny, data: corpus")
    try:
        loss_ax, lr_ax = fig.axes
        assert loss_ax.get_title() == "run: --mode relora, preset tiny, data: corpus"
        labels = loss_ax.get_legend_handles_labels()[1]
        for label in ("train loss (each step)", "train loss (moving average, bias-corrected)", "val loss",
                      "ReLoRA restart", "LoRA phase starts", "resumed here"):
            assert label in labels
        resumed = [line for line in loss_ax.lines if line.get_label() == "resumed here"]
        assert list(resumed[0].get_xdata()) == [40 * 1024] * 2  # at the end of the step resumed from
        (lr_line,) = lr_ax.lines
        assert list(lr_line.get_ydata()) == [r["lr"] for r in rows]
        assert lr_ax.get_ylabel() == "learning rate"
        # The first losses (8.3 at step 0) are cut off, and the plot says where the run started.
        assert loss_ax.get_ylim()[1] < 8.0
        assert any("starts at 8.30" in text.get_text() for text in loss_ax.texts)
        fig.canvas.draw()
        assert "120k" in [t.get_text() for t in lr_ax.get_xticklabels()]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)

    png = tmp_path / "loss.png"
    checkpoints.plot_metrics(write_metrics(tmp_path, rows) / "metrics.jsonl", png, "run")
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_runs_overlays_several_runs(tmp_path, capsys):
    runs = [write_metrics(tmp_path / name, metrics_rows(steps)) for name, steps in (("full", 120), ("relora", 100))]
    out = tmp_path / "compare.png"
    assert plot_runs.main([str(runs[0]), f"ReLoRA={runs[1] / 'metrics.jsonl'}", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out == f"wrote {out}\n"
    fig = plots.draw([plot_runs.load_run(str(runs[0])), plot_runs.load_run(f"ReLoRA={runs[1]}")], "t")
    try:
        assert [line.get_label() for line in fig.axes[1].lines] == ["full", "ReLoRA"]
        assert {"full: train", "full: val", "ReLoRA: train", "ReLoRA: val"} <= set(
            fig.axes[0].get_legend_handles_labels()[1])
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_runs.main([str(tmp_path / "missing"), "-o", str(out)])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_resumed_run_marks_where_it_resumed(tmp_path, one_thread):
    corpus, cache, out = write_corpus(tmp_path / "corpus", n_files=4), tmp_path / "cache", tmp_path / "run"
    args = tiny_args(corpus, cache, out, "--mode", "full", "--max_steps", "4", "--ckpt_every", "2", "--keep_ckpts", "3",
                     "--eval_every", "4")
    assert pretrain_gpt2.main(args) == 0
    assert not any("resumed_from" in r for r in read_rows(out))
    shutil.rmtree(out / "ckpt" / "step_00000004")  # as if killed before that checkpoint
    assert pretrain_gpt2.main([*args, "--resume"]) == 0
    rows = read_rows(out)
    assert [r["step"] for r in rows if "resumed_from" in r] == [3] and rows[3]["resumed_from"] == 2
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
