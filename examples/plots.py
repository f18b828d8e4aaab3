"""Pictures of training runs from their metrics.jsonl rows: loss.png of one run, and several runs overlaid.

Two panels over the tokens seen: the losses (each step's training loss faint, its bias-corrected moving average,
the val losses as dots) and the learning rate, whose jagged shape is ReLoRA's schedule. The loss axis starts at the
high quantile of the training losses rather than at the first loss, so the part of the run that is still worth
reading is not squeezed under the first drop; restarts, the switch to LoRA and resumes are marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The moving average remembers about 1 / (1 - beta) steps: this fraction of the run's steps (at least one), so that
# its lag behind a falling loss is the same small share of the picture's width however long the run.
EMA_SPAN_OF_RUN = 1 / 40
# The loss axis ends at this quantile of the training losses (plus a margin): the first steps' losses, far above the
# rest, are cut off (the starting loss is written on the plot instead).
TOP_QUANTILE = 0.95


@dataclass
class Run:
    """One run's rows of metrics.jsonl and the name it is shown under."""

    name: str
    rows: list[dict]


def ema_beta(steps: int) -> float:
    """The moving average's beta for a run of `steps` steps: 1 - 1 / max(1, steps * EMA_SPAN_OF_RUN)."""
    return 1 - 1 / max(1.0, steps * EMA_SPAN_OF_RUN)


def debiased_ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average with Adam's bias correction: m_t = beta m_{t-1} + (1 - beta) x_t from m_0 = 0,
    shown as m_t / (1 - beta^t). Without the correction m_t starts at 0 (or, started at x_1, lags the falling loss
    by ~1 / (1 - beta) steps); with it, every point is a weighted mean of the values so far, with weights summing to
    1. Non-finite values (skipped steps) are left out and repeat the previous average (nan before any value)."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    smooth, m, t = [], 0.0, 0
    for x in values:
        if x is not None and math.isfinite(x):
            t += 1
            m = beta * m + (1 - beta) * x
        smooth.append(m / (1 - beta**t) if t else math.nan)
    return smooth


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def loss_range(losses: list[float]) -> tuple[float, float]:
    """(bottom, top) of the loss axis: from the lowest loss to the TOP_QUANTILE quantile, 5 % of that span added on
    either side."""
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), quantile(finite, TOP_QUANTILE)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - margin, high + margin


def short_count(x: float, _pos=None) -> str:
    """Tick label of a count: 950, 100k, 1.5M, 2B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None and "tokens" in r]
    return [t for t, _ in pairs], [v for _, v in pairs]


def _mark(ax, rows: list[dict], color, with_labels: bool) -> None:
    """Dashed lines at restarts, a dotted line at the switch to LoRA, a solid one at each resume."""
    kinds = (("restart", "gray", "--", 0.8, "ReLoRA restart"), ("lora_start", "tab:red", ":", 1.2, "LoRA phase starts"),
             ("resumed_from", "black", "-", 1.0, "resumed here"))
    for key, own_color, style, width, label in kinds:
        for i, r in enumerate(r for r in rows if r.get(key)):
            # The step a resume continued from ends at the tokens of that step, where the line goes.
            tokens = r["tokens"] if key != "resumed_from" else _tokens_at_step(rows, r["resumed_from"], r["tokens"])
            ax.axvline(tokens, color=own_color if color is None else color, ls=style, lw=width, alpha=0.8,
                       label=label if with_labels and i == 0 else None)


def _tokens_at_step(rows: list[dict], step: int, default: int) -> int:
    return next((r["tokens"] for r in rows if r.get("step") == step and "tokens" in r), default)


def draw(runs: list[Run], title: str):
    """The figure (matplotlib, Agg) of one or several runs: losses above, learning rate below, over tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(3, 1))
    single = len(runs) == 1
    all_losses, first_losses = [], []
    for i, run in enumerate(runs):
        color = "tab:blue" if single else f"C{i}"
        tokens, train = _series(run.rows, "train_loss")
        val_tokens, val = _series(run.rows, "val_loss")
        name = "" if single else f"{run.name}: "
        if train:
            if single:
                loss_ax.plot(tokens, train, lw=0.6, alpha=0.3, color=color, label="train loss (each step)")
            loss_ax.plot(tokens, debiased_ema(train, ema_beta(len(train))), lw=1.4, color=color,
                         label=f"{name}train loss (moving average, bias-corrected)" if single else f"{name}train")
            all_losses += train
            first_losses.append(train[0])
        if val:
            loss_ax.plot(val_tokens, val, "o-" if single else "o--", ms=4, lw=1 if single else 0.8,
                         color="tab:orange" if single else color, label=f"{name}val loss" if single else f"{name}val")
            all_losses += val[1:] if len(val) > 1 else val  # the step-0 loss of the untrained model is not scaled
            first_losses.append(val[0])
        lr_tokens, lr = _series(run.rows, "lr")
        lr_ax.plot(lr_tokens, lr, lw=1.0, color=color, label=run.name if not single else None)
        _mark(loss_ax, run.rows, None if single else color, with_labels=single)
    bottom, top = loss_range(all_losses)
    loss_ax.set_ylim(bottom, top)
    if first_losses and max(first_losses) > top:
        loss_ax.text(0.99, 0.97, f"starts at {max(first_losses):.2f} (above the axis)", transform=loss_ax.transAxes,
                     ha="right", va="top", fontsize=8, color="dimgray")
    loss_ax.set(ylabel="cross-entropy loss (nats)", title=title)
    lr_ax.set(xlabel="tokens", ylabel="learning rate")
    lr_ax.xaxis.set_major_formatter(FuncFormatter(short_count))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8, loc="upper right" if not (first_losses and max(first_losses) > top) else "center right")
    if not single:
        lr_ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
