"""ReLoRA on FSDP2-sharded parameters (torch.distributed.fsdp.fully_shard, whose parameters are DTensors).

Between steps FSDP2 keeps each parameter as a DTensor sharded on dim 0, so a rank holds rows of W (N, K), of
B (N, r) and of A (r, K). W and B share N and their placements, so their rows split at the same boundaries and a
ReLoRA restart is local to each rank:

    A_full = A.full_tensor()                     the one collective: an all-gather of A (r x K, small)
    W_local += s * B_local @ A_full              merge of this rank's rows; W is never gathered
    A_full <- reinit(seed)                       the whole new A, drawn on every rank (no communication)
    A_local <- this rank's block of A_full       so element (i, k) is keyed by its global flat index i * K + k
    B_local <- 0

Both steps run through `functional.merge_and_reinit_` on the local tensors, so the Triton kernels (or the
reference, per RELORA_KERNELS_BACKEND) do the math exactly as they do unsharded. Drawing the whole A on every rank,
rather than only its own rows, reuses the reinit op unchanged and costs r x K draws, next to the N x K merge;
the gathered A is the buffer it is drawn into, and the new A is bit-identical to a single process's.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ._validate import check_lora_shapes, is_dtensor
from .functional import merge_and_reinit_


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage, so in-place writes reach the DTensor); t otherwise."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor: all-gathered from a DTensor (a collective: every rank of its mesh must call it), or t."""
    return t.full_tensor() if is_dtensor(t) else t


def fsdp_managed(model: nn.Module) -> set[str]:
    """Names of the modules of `model` whose parameters FSDP2 manages: those at or under a fully_shard'ed module."""
    # As for DTensor, an FSDP2 module exists only once torch.distributed.fsdp has been imported.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return set()
    roots = [name for name, module in model.named_modules() if isinstance(module, fsdp.FSDPModule)]
    return {name for name, _ in model.named_modules()
            if any(root == "" or name == root or name.startswith(root + ".") for root in roots)}


def _shard_box(name: str, t, rows_only: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's block of DTensor t, checked against its local tensor.

    rows_only: t must be sharded on dim 0 only, so that a rank holds whole rows.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # what DCP uses

    for placement in t.placements:
        # Shard subclasses (_StridedShard, FSDP2 over tensor parallelism) hold non-contiguous rows: no block.
        plain = type(placement) in (Shard, Replicate)
        if not plain or (rows_only and isinstance(placement, Shard) and placement.dim != 0):
            raise ValueError(f"{name} has placements {t.placements}; a shard-local ReLoRA restart needs "
                             f"{'Shard(0)' if rows_only else 'Shard(dim)'} or Replicate() (FSDP2's default is "
                             f"Shard(0))")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(t.to_local().shape) != tuple(shape):
        raise RuntimeError(f"{name}: local shard {tuple(t.to_local().shape)} is not the {tuple(shape)} block its "
                           f"placements {t.placements} give")
    return tuple(shape), tuple(offset)


def merge_and_reinit_sharded_(weight, lora_a, lora_b, scale, *, seed: int) -> None:
    """ReLoRA restart of one layer whose weight (N, K), lora_a (r, K) and lora_b (N, r) are DTensors (FSDP2), in place.

    Afterwards the layer holds what `merge_and_reinit_` gives unsharded: W + scale * B @ A in every rank's rows of
    W (merged row by row, so equal to the single-process W up to the fp32 rounding of the r-term sums), A drawn
    from `seed` exactly as a single process draws it (bit-identical once gathered), and B = 0.

    A collective: every rank of the mesh calls it, for the layers in the same order (A is all-gathered once; W and
    B are never communicated). Call it between steps, when FSDP2 holds the parameters sharded.

    Raises TypeError unless all three are DTensors, ValueError if W and B do not split their rows at the same
    boundaries (different meshes or placements, or a placement other than Shard(0) / Replicate() on them).
    """
    tensors = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    plain = [name for name, t in tensors.items() if not is_dtensor(t)]
    if plain:
        raise TypeError(f"merge_and_reinit_sharded_ takes DTensors (FSDP2-sharded parameters); "
                        f"{', '.join(plain)} {'is a' if len(plain) == 1 else 'are'} plain torch.Tensor")
    # Global shapes first, identical on every rank, so that no rank raises while another gathers.
    check_lora_shapes(weight, lora_a, lora_b)
    if weight.device_mesh != lora_b.device_mesh or weight.placements != lora_b.placements:
        raise ValueError(f"weight ({weight.placements} on {weight.device_mesh}) and lora_b ({lora_b.placements} on "
                         f"{lora_b.device_mesh}) must be sharded alike for a shard-local merge")
    w_shape, w_offset = _shard_box("weight", weight, rows_only=True)
    b_shape, b_offset = _shard_box("lora_b", lora_b, rows_only=True)
    # Same N and placements give the same row blocks; checked, since the merge pairs W's rows with B's.
    if w_shape[0] != b_shape[0] or w_offset[0] != b_offset[0]:
        raise RuntimeError(f"weight rows {w_offset[0]}:{w_offset[0] + w_shape[0]} and lora_b rows "
                           f"{b_offset[0]}:{b_offset[0] + b_shape[0]} of this rank differ")
    a_shape, a_offset = _shard_box("lora_a", lora_a, rows_only=False)

    with torch.no_grad():
        full_a = lora_a.full_tensor()
        # Merges with the gathered A, then draws the new A over it in full and zeros this rank's rows of B.
        merge_and_reinit_(weight.to_local(), full_a, lora_b.to_local(), scale, seed=seed)
        block = tuple(slice(start, start + size) for start, size in zip(a_offset, a_shape, strict=True))
        lora_a.to_local().copy_(full_a[block])
