"""The --fsdp path of pretrain_gpt2.py: FSDP2 wrapping, the switch to LoRA on a sharded model, sharded checkpoints.

Wrapping: every transformer block is one fully_shard unit and the root (embeddings, final LayerNorm, tied head) is
another, so a rank holds 1/world of every parameter, gradient and Adam moment, and one block's weights are gathered
at a time. On GPU the blocks compute in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy); the sharded
parameters and Adam state stay fp32.

Checkpoints (torch.distributed.checkpoint, DCP): ckpt/step_XXXXXXXX/ holds DCP's files (.metadata and one
__R_0.distcp per rank: its shards of the model and optimizer state), state.pt (rank 0: the step, config, ReLoRA
counter, RNG state, data manifest) and DONE. Every rank writes into one temporary folder; after a barrier rank 0
renames it into place and writes DONE, so a kill at any point leaves either the previous checkpoint or a folder
without DONE, which does not count. DCP reshards on load, so a checkpoint resumes at another world size.
Assumes one file system seen by every rank (one machine, or a shared file system).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from checkpoints import mark_done
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from relora_kernels.utils import atomic_folder

_MESH = {}


def mesh_for(device: torch.device):
    """One 1-D mesh over all ranks per device type, shared by every wrap (the Adam state carried over the switch to
    LoRA stays on the mesh of the new parameters)."""
    if device.type not in _MESH:
        _MESH[device.type] = init_device_mesh(device.type, (dist.get_world_size(),))
    return _MESH[device.type]


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard every block of model.h, then the root; moves this rank's shards to `device`."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    mesh = mesh_for(device)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_on_cpu(model: torch.nn.Module) -> dict:
    """Every entry of model.state_dict() whole, on the CPU: gathered one tensor at a time (a collective), so the
    device never holds more than one unsharded tensor beyond the shards."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in model.state_dict().items()}


def local_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's shards are finite (a collective)."""
    ok = torch.tensor(int(all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                              for p in model.parameters())))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def plain(t):
    """A DTensor's value as a plain tensor (e.g. the replicated gradient norm); t otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save(root: Path, step: int, model, optimizer, state: dict | None) -> Path:
    """Write ckpt step `step` under root (= out_dir/ckpt) from every rank; `state` is rank 0's state.pt (None on the
    others). Returns the final folder. Raises OSError (on every rank) when a rank's write fails; the temporary
    folder is then removed and the earlier checkpoints are untouched."""
    rank = dist.get_rank()
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-sharded"
    with atomic_folder(final, tmp) if rank == 0 else nullcontext():  # rank 0 creates, renames or removes tmp
        dist.barrier()
        failed = None
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            # DCP gathers every rank's write results and raises on all ranks if one failed; sync_files fsyncs them.
            dcp.save({"model": model_state, "optim": optim_state}, storage_writer=dcp.FileSystemWriter(tmp))
            if rank == 0:
                torch.save(state, tmp / "state.pt")
        except Exception as e:  # noqa: BLE001 -- reported on every rank below, so that no rank waits on another
            failed = e
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if failed is None else f"rank {rank}: {failed}")
        if any(errors):
            raise OSError(next(e for e in errors if e))
    if rank == 0:  # every rank's shards are on disk (the barrier of the gather above): now it counts
        mark_done(final, step=step, world=dist.get_world_size())
    dist.barrier()
    return final


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / ".metadata").exists()


def check(ckpt: Path) -> None:
    """Raise OSError unless DCP's index reads and every shard file it names holds the bytes it points to (a kill or
    a full disk can truncate one rank's file); reads no tensor."""
    metadata = dcp.FileSystemReader(ckpt).read_metadata()
    for info in (metadata.storage_data or {}).values():
        path = ckpt / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            raise OSError(f"shard file {info.relative_path} is missing or truncated")


def load(ckpt: Path, model, optimizer) -> None:
    """Load a sharded checkpoint into the sharded model and its optimizer, resharding to this world size."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
