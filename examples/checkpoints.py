"""The pre-training example's files: checkpoints (ckpt/step_XXXXXXXX/), the out_dir lock, metrics.jsonl, loss.png.

A checkpoint folder is written under a temporary name, renamed into place, then marked DONE (atomic_folder): a write
interrupted at any point leaves at worst a folder without DONE, which is ignored, and the previous checkpoint intact.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from config import UsageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from relora_kernels.utils import atomic_folder, atomic_write, fsync


class RunError(Exception):
    """The run cannot go on (divergence, non-finite weights): reported in one line, exit status 1."""


def mark_done(final: Path, **info) -> None:
    """The DONE marker that makes a renamed folder a checkpoint."""
    (final / "DONE").write_text(json.dumps(info) + "\n")
    fsync(final / "DONE")
    fsync(final.parent)


# --- checkpoints: ckpt/step_XXXXXXXX/{model.safetensors, state.pt, DONE} -------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a DONE marker), oldest first."""
    found = [d for d in (out_dir / "ckpt").glob("step_*") if re.fullmatch(r"step_\d{8}", d.name)]
    return sorted((d for d in found if (d / "DONE").exists()), key=lambda d: d.name)


def save_checkpoint(out_dir: Path, step: int, model, state: dict, keep: int) -> Path:
    """model.safetensors + state.pt in an atomic folder, then DONE, then the oldest beyond `keep` pruned. A failed
    write (a full disk) removes its temporary folder and raises RunError."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RunError(f"step {step}: the weights are not finite; refusing to write a checkpoint over good ones")
    root = out_dir / "ckpt"
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-{os.getpid()}"
    try:
        with atomic_folder(final, tmp):
            save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head.weight, restored on load
            torch.save(state, tmp / "state.pt")
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise RunError(f"step {step}: {reason} writing checkpoint {final}; removed the partial {tmp.name}, the "
                       "earlier checkpoints are intact (--resume continues from the newest)") from None
    mark_done(final, step=step)
    prune_checkpoints(out_dir, keep)
    return final


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(out_dir)[:-keep]:
        (old / "DONE").unlink()  # first, so that a prune cut short leaves no half checkpoint that counts as one
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def clean_checkpoints(out_dir: Path, log) -> None:
    """Remove what interrupted writes and prunes leave: temporary folders and step folders without DONE. Run under
    the out_dir lock, so no other process is writing them."""
    root = out_dir / "ckpt"
    junk = [d for d in root.glob(".tmp-step_*") if d.is_dir()]
    junk += [d for d in root.glob("step_*") if d.is_dir() and not (d / "DONE").exists()]
    for d in junk:
        shutil.rmtree(d, ignore_errors=True)
    if junk:
        log(f"removed {len(junk)} unfinished checkpoint folder(s) in {root}: {', '.join(sorted(d.name for d in junk))}")


def newest_loadable_checkpoint(out_dir: Path, log, move_broken: bool = True) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint whose state and weights files load, and its state. A newer one that does not is
    renamed broken-step_XXXXXXXX (kept to inspect, no longer a checkpoint; by rank 0 only), and the log says why."""
    import fsdp as sharded  # here: fsdp.py writes its folders with atomic_folder too

    ckpts = checkpoint_dirs(out_dir)
    for ckpt in reversed(ckpts):
        try:
            state = load_checkpoint_state(ckpt)
            if sharded.is_sharded(ckpt):  # DCP's index and the shard files it names: a truncated one fails here
                sharded.check(ckpt)
            else:
                with safe_open(ckpt / "model.safetensors", "pt"):  # reads the header: a truncated file fails here
                    pass
            return ckpt, state
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            broken = ckpt.with_name(f"broken-{ckpt.name}")
            if move_broken:
                shutil.rmtree(broken, ignore_errors=True)
                ckpt.rename(broken)
            log(f"skipping checkpoint {ckpt}: {str(e).splitlines()[0][:200]}; moved it to {broken.name}")
    if ckpts:
        raise UsageError(f"none of the {len(ckpts)} checkpoints in {out_dir / 'ckpt'} loads (see above); a new "
                         "--out_dir, or deleting the folder, starts over")
    return None, None


@contextmanager
def out_dir_lock(out_dir: Path, log):
    """Hold an exclusive lock on out_dir for the run; a second run there is refused, naming the holder's pid. The
    lock is the kernel's (flock), so it dies with its process: a killed run's lock file is simply taken over."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"--out_dir {out_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"--out_dir {out_dir} is in use by another run (pid {holder}); wait for it to end, or "
                             "use another --out_dir") from None
        if previous := os.pread(fd, 32, 0).decode(errors="replace").strip():
            log(f"{out_dir}: taking over the lock of a run that did not end cleanly (pid {previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an ended run leaves an empty lock file: a pid left in it is a run that was killed
    finally:
        os.close(fd)


# --- metrics, the summary and the plot --------------------------------------------------------------------------


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # reopened every step, so a crash loses at most the current line
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (the process killed mid-write) is left out."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunError(f"{path}: line {i + 1} is not JSON (only a last line can be torn by a kill)") from None
    return rows


def restart_metrics(path: Path, start_step: int, log) -> None:
    """Make metrics.jsonl hold the rows up to start_step, the step resumed from: later rows are for steps that will
    run again, a torn last line is dropped. Rewritten atomically, and only when that changes it. A run from step 0
    moves an earlier file aside (metrics.previous.jsonl) rather than empty it."""
    if not path.exists():
        return
    text, rows = path.read_text(), read_metrics(path)
    if start_step == 0:
        if rows:
            os.replace(path, path.with_name("metrics.previous.jsonl"))
            log(f"{path}: {len(rows)} rows of an earlier run that left no checkpoint, moved to metrics.previous.jsonl")
        return
    kept = [r for r in rows if r["step"] <= start_step]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new != text:
        mode = path.stat().st_mode

        def write(tmp):
            Path(tmp).write_text(new)
            os.chmod(tmp, mode)  # the rewritten file keeps the mode of the one it replaces

        atomic_write(path, write)
        log(f"{path}: kept the {len(kept)} rows up to step {start_step}, dropped {len(rows) - len(kept)} after it"
            + ("" if text.endswith("\n") and len(text.splitlines()) == len(rows) else " and a torn last line"))


def _ema(points: list[tuple]) -> list[tuple]:
    """An exponential moving average of (tokens, loss): single batches are too noisy to read."""
    smooth, ema = [], points[0][1]
    for tokens, loss in points:
        ema = 0.9 * ema + 0.1 * loss if math.isfinite(loss) else ema
        smooth.append((tokens, ema))
    return smooth


def plot_metrics(path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    train = [(r["tokens"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.6, alpha=0.3, color="tab:blue")
        ax.plot(*zip(*_ema(train), strict=True), lw=1.2, color="tab:blue", label="train loss (EMA)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=4, color="tab:orange", label="val loss")
    for i, r in enumerate(r for r in rows if r.get("restart")):
        ax.axvline(r["tokens"], color="gray", ls="--", lw=0.8, label="ReLoRA restart" if i == 0 else None)
    for r in rows:
        if r.get("lora_start"):
            ax.axvline(r["tokens"], color="tab:red", ls=":", lw=1.2, label="LoRA phase starts")
    ax.set(xlabel="tokens", ylabel="cross-entropy loss (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
