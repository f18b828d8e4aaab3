"""The pre-training example's files: checkpoints (ckpt/step_XXXXXXXX/), the out_dir lock, metrics.jsonl, loss.png.

A checkpoint folder is written under a temporary name, renamed into place, then marked DONE (atomic_folder): a write
interrupted at any point leaves at worst a folder without DONE, which is ignored, and the previous checkpoint intact.
DONE (JSON) also holds the SHA-256 of the small files a resume parses (state.pt, DCP's .metadata), so that a bit flipped
in them after the write is found before anything is loaded.

A checkpoint is data, never code: nothing read on resume can run code. model.safetensors is safetensors, state.pt is
read with torch.load(weights_only=True), and the --fsdp files through fsdp.py's readers (a restricted unpickler for
DCP's .metadata, weights_only=True for its tensors and byte items). A file that does not parse as what it should be
raises UnreadableCheckpoint, and the resume falls back to the previous checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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
from torch.distributed.checkpoint.api import CheckpointException

from relora_kernels.utils import atomic_folder, atomic_write


class RunError(Exception):
    """The run cannot go on (divergence, non-finite weights, a full disk): reported in one line, exit status 1."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that does not parse as what it should be: truncated, corrupt, or planted."""


def first_line(e: BaseException) -> str:
    """An exception's message in one line for the log; its type when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# The small files a resume parses, checksummed in DONE; the tensor files are checked by their headers and sizes.
CHECKSUMMED = ("state.pt", ".metadata")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mark_done(final: Path, **info) -> None:
    """The DONE marker that makes a renamed folder a checkpoint: `info` and the checksums of CHECKSUMMED files."""
    digests = {name: sha256(final / name) for name in CHECKSUMMED if (final / name).is_file()}
    text = json.dumps({**info, "sha256": digests}) + "\n"
    atomic_write(final / "DONE", lambda tmp: Path(tmp).write_text(text))


def check_done(ckpt: Path) -> dict:
    """DONE's contents, once the files it checksums match; raises UnreadableCheckpoint otherwise. A DONE of an
    earlier version (no checksums) checks nothing more."""
    try:
        done = json.loads((ckpt / "DONE").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"DONE is not JSON ({first_line(e)})") from None
    digests = done.get("sha256", {}) if isinstance(done, dict) else None
    if not isinstance(digests, dict) or set(digests) - set(CHECKSUMMED):
        raise UnreadableCheckpoint("DONE is not a checkpoint's marker (a JSON object with the files' checksums)")
    for name, want in digests.items():
        if sha256(ckpt / name) != want:
            raise UnreadableCheckpoint(f"{name} does not match its checksum in DONE: changed after it was written")
    return done


def root_cause(e: BaseException) -> BaseException:
    """The OSError behind a failed write, where one can be found: inside DCP's CheckpointException (by rank), the
    exception torch.save's writer raised while handling it, the "(os error N)" of safetensors' message."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
            continue
        if isinstance(e, OSError):
            return e
        if match := re.search(r"\(os error (\d+)\)", str(e)):
            return OSError(int(match[1]), os.strerror(int(match[1])))
        if (e.__cause__ or e.__context__) is None:
            break
        e = e.__cause__ or e.__context__
    return e


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict; a DTensor counts whole, all ranks' shards together."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    unit = next((u for u, e in (("GiB", 30), ("MiB", 20)) if n >= 2**e), "KiB")
    return f"{n / 2 ** {'GiB': 30, 'MiB': 20, 'KiB': 10}[unit]:.1f} {unit}"


def write_failure(e: BaseException, path: Path, needed: int | None = None, what: str = "") -> str:
    """'<reason> writing <path> (it needs about N MiB, M MiB free there)': what a failed write reports."""
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)).lower()
    space = []
    if needed is not None:
        space.append(f"it needs about {_size(needed)}")
    folder = path if path.is_dir() else path.parent
    try:
        space.append(f"{_size(shutil.disk_usage(folder).free)} free there")
    except OSError:
        pass
    return f"{reason} writing {what}{path}" + (f" ({', '.join(space)})" if space else "")


@contextmanager
def reported_write(path: Path, needed: int | None = None):
    """A failed write of `path` (a full disk, a quota, an I/O error) ends the run with one line naming it and the
    space it needed; the files it would have replaced are intact (every write is atomic or an append)."""
    try:
        yield
    except OSError as e:
        raise RunError(f"{write_failure(e, path, needed)}; the checkpoints are intact (--resume continues from the "
                       "newest)") from None


def checkpoint_failure(step: int, final: Path, e: BaseException, needed: int) -> RunError:
    return RunError(f"step {step}: {write_failure(e, final, needed, 'checkpoint ')}; removed the partial checkpoint, "
                    "the earlier ones are intact (--resume continues from the newest)")


# --- checkpoints: ckpt/step_XXXXXXXX/{model.safetensors, state.pt, DONE} -------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a DONE marker), oldest first."""
    found = [d for d in (out_dir / "ckpt").glob("step_*") if re.fullmatch(r"step_\d{8}", d.name)]
    return sorted((d for d in found if (d / "DONE").exists()), key=lambda d: d.name)


def save_checkpoint(out_dir: Path, step: int, model, state: dict, keep: int) -> Path:
    """model.safetensors + state.pt in an atomic folder, then DONE, then the oldest beyond `keep` pruned. A failed
    write (a full disk) removes what it wrote and raises RunError naming the space it needed."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RunError(f"step {step}: the weights are not finite; refusing to write a checkpoint over good ones")
    root = out_dir / "ckpt"
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-{os.getpid()}"
    try:
        with atomic_folder(final, tmp):
            save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head.weight, restored on load
            save_state(state, tmp / "state.pt")
        mark_done(final, step=step)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap the OSError
        if not (final / "DONE").exists():  # renamed but not marked: not a checkpoint, and in the way of the next
            shutil.rmtree(final, ignore_errors=True)
        needed = tensor_bytes(model.state_dict()) + tensor_bytes(state)
        raise checkpoint_failure(step, final, root_cause(e), needed) from None
    prune_checkpoints(out_dir, keep)
    return final


def save_state(state: dict, path: Path) -> None:
    """torch.save through a Python file, so that a failed write raises the OSError (its writer given a path raises
    only "unexpected pos")."""
    with open(path, "wb") as f:
        torch.save(state, f)


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(out_dir)[:-keep]:
        (old / "DONE").unlink()  # first, so that a prune cut short leaves no half checkpoint that counts as one
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_state(ckpt: Path) -> dict:
    """state.pt, read with torch.load(weights_only=True): tensors and plain containers only, never code. Raises
    UnreadableCheckpoint for a file that does not parse as one (truncated, corrupt, or holding other objects)."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- parsing untrusted bytes can raise any type: each means "unreadable"
        raise UnreadableCheckpoint(f"state.pt: {first_line(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UnreadableCheckpoint("state.pt does not hold a checkpoint's state (a dict with its step)")
    return state


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
            check_done(ckpt)
            state = load_checkpoint_state(ckpt)
            if sharded.is_sharded(ckpt):  # DCP's index, its byte items and the sizes of the shard files it names
                sharded.check(ckpt)
            else:
                check_safetensors(ckpt / "model.safetensors")
            return ckpt, state
        except (OSError, UnreadableCheckpoint, SafetensorError, pickle.UnpicklingError) as e:
            broken = ckpt.with_name(f"broken-{ckpt.name}")
            if move_broken:
                shutil.rmtree(broken, ignore_errors=True)
                ckpt.rename(broken)
            log(f"skipping checkpoint {ckpt}: {first_line(e)}; moved it to {broken.name}")
    if ckpts:
        raise UsageError(f"none of the {len(ckpts)} checkpoints in {out_dir / 'ckpt'} loads (see above); a new "
                         "--out_dir, or deleting the folder, starts over")
    return None, None


def check_safetensors(path: Path) -> None:
    """Raise SafetensorError unless the header parses and fits the file's size (safetensors checks both)."""
    with safe_open(path, "pt"):
        pass


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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise UsageError(f"--out_dir {out_dir}: {write_failure(e, out_dir / '.lock')}") from None
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an ended run leaves an empty lock file: a pid left in it is a run that was killed
    finally:
        os.close(fd)


# --- metrics, the summary and the plot --------------------------------------------------------------------------


def append_metrics(path: Path, row: dict) -> None:
    """One row, appended. A write cut short (a kill, a full disk) tears at most this last line, which
    read_metrics leaves out."""
    line = json.dumps(row) + "\n"
    with reported_write(path, len(line.encode())), open(path, "a") as f:  # reopened every step: a crash loses one line
        f.write(line)


def write_json(path: Path, obj) -> None:
    """A whole JSON file, atomically (a failed write leaves the old one) and reported in one line if it fails."""
    text = json.dumps(obj, indent=1) + "\n"
    with reported_write(path, len(text.encode())):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


def restart_metrics(path: Path, start_step: int, log, restarts: int | None = None) -> None:
    """Make metrics.jsonl hold the rows up to start_step, the step resumed from: later rows are for steps that will
    run again, a torn last line is dropped. Rewritten atomically, and only when that changes it. A run from step 0
    moves an earlier file aside (metrics.previous.jsonl) rather than empty it. `restarts`: the row of start_step is
    marked as a restart, with this count (a restart made at resume, see pretrain_gpt2.py)."""
    if not path.exists():
        return
    text, rows = path.read_text(), read_metrics(path)
    if start_step == 0:
        if rows:
            os.replace(path, path.with_name("metrics.previous.jsonl"))
            log(f"{path}: {len(rows)} rows of an earlier run that left no checkpoint, moved to metrics.previous.jsonl")
        return
    kept = [r for r in rows if r["step"] <= start_step]
    if restarts is not None:
        kept = [{**r, "restart": True, "restarts": restarts} if r["step"] == start_step else r for r in kept]
    new = "".join(json.dumps(r) + "\n" for r in kept)
    if new != text:
        mode = path.stat().st_mode

        def write(tmp):
            Path(tmp).write_text(new)
            os.chmod(tmp, mode)  # the rewritten file keeps the mode of the one it replaces

        with reported_write(path, len(new.encode())):
            atomic_write(path, write)
        dropped = len(rows) - len([r for r in rows if r["step"] <= start_step])
        log(f"{path}: kept the {len(kept)} rows up to step {start_step}, dropped {dropped} after it"
            + ("" if text.endswith("\n") and len(text.splitlines()) == len(rows) else " and a torn last line"))


def plot_metrics(path: Path, png: Path, title: str) -> None:
    """Draw loss.png from metrics.jsonl (plots.py: losses with their bias-corrected moving average, the learning
    rate, restarts and resumes marked), written atomically."""
    import matplotlib.pyplot as plt
    from plots import Run, draw

    fig = draw([Run(png.parent.name, read_metrics(path))], title)
    try:
        with reported_write(png, png.stat().st_size if png.exists() else None):  # the old plot's size: about right
            atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
