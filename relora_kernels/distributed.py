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

FP8 frozen weights (LoRALinear(frozen_dtype="fp8")) under FSDP2: the layer's W is sharded on dim 0 by the package
(modules.fsdp_shard_fp8_weights) and left out of FSDP2's all-gather (fully_shard's ignored_params), and each rank
keeps the FP8 copies of its own rows. The forward copy (W by rows, a scale per row) of a block of rows is that
block of the whole copy; the backward copy (W.T by rows) is scaled by W's column maxima over all rows, so a rank
quantises its columns of W.T with the maxima all-reduced (K floats, at each refresh: quantize_fp8_weight_shard), and
its block is bit for bit that of W.T quantised whole. Each pass all-gathers the one copy it reads (gather_fp8_weight):
1 byte per element of W for the forward and 1 for the backward, where FSDP2 would gather W in its dtype twice.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ._validate import check_lora_shapes, is_dtensor
from .functional import merge_and_reinit_, quantize_fp8_weight
from .reference import FP8Weight


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


def _rows_per_rank(t) -> int:
    """The rows of a block of DTensor t sharded Shard(0) over a 1-D mesh, as torch.chunk splits it: ceil(N / world)
    (the last ranks may hold fewer, or none)."""
    return -(-t.shape[0] // t.device_mesh.size())


def _row_shard(name: str, t) -> tuple[int, int, int]:
    """(offset, rows, rows per rank) of this rank's block of DTensor t, sharded on dim 0 over a 1-D mesh as
    torch.chunk splits it (DTensor's Shard(0): every rank but the last ones holds ceil(N / world) rows)."""
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"{name} must be sharded Shard(0) over a 1-D device mesh (FSDP2's layout), got "
                         f"{t.placements} over a {t.device_mesh.ndim}-D mesh")
    shape, offset = _shard_box(name, t, rows_only=True)
    per_rank = _rows_per_rank(t)
    if offset[0] != t.device_mesh.get_local_rank() * per_rank and shape[0] > 0:
        raise RuntimeError(f"{name}: this rank's rows start at {offset[0]}, not where torch.chunk puts them")
    return offset[0], shape[0], per_rank


def quantize_fp8_weight_shard(weight) -> FP8Weight:
    """The FP8 copies of this rank's rows of W (a DTensor sharded Shard(0) over a 1-D mesh), as FP8Weight of local
    tensors: q (n, K) and scale (n,) of its rows; q_t (K, n) of its columns of W.T, scaled by the whole W's column
    maxima, and scale_t (K,), the same on every rank. Bit for bit the blocks of quantize_fp8_weight(W whole).

    A collective (an all-reduce of K floats): every rank of the mesh calls it, for the layers in the same order.
    """
    import torch.distributed as dist

    _row_shard("weight", weight)
    local = weight.to_local().detach()
    with torch.no_grad():
        column_amax = (local.abs().amax(dim=0).float() if local.shape[0] > 0
                       else local.new_zeros(local.shape[1], dtype=torch.float32))
        dist.all_reduce(column_amax, op=dist.ReduceOp.MAX, group=weight.device_mesh.get_group())
        return quantize_fp8_weight(local, column_amax)


def _all_gather_blocks(block: torch.Tensor, per_rank: int, group) -> torch.Tensor:
    """(world, *block's shape with dim -1 padded to per_rank) of every rank's block, gathered as bytes (a float8
    tensor travels as uint8: gloo has no float8 type)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    # Padded as bytes too (e4m3's zero is the zero byte): compiled, a float8 tensor takes nothing but views, as
    # Inductor's lowering of a write into a slice of one mixes its dtype with a mask's.
    wire = block.view(torch.uint8) if block.dtype.itemsize == 1 else block
    padded = wire.new_zeros((*wire.shape[:-1], per_rank))
    padded[..., :wire.shape[-1]] = wire
    out = padded.new_empty((world * padded.shape[0], *padded.shape[1:]))  # gathered along dim 0, as gloo requires
    dist.all_gather_into_tensor(out, padded, group=group)
    out = out.view(world, *padded.shape)
    return out.view(block.dtype) if wire is not block else out


def gather_fp8_weight(local: FP8Weight, weight, *, rows: bool = True, transposed: bool = True) -> FP8Weight:
    """The whole FP8Weight of W from every rank's quantize_fp8_weight_shard(weight) (`local`, this rank's): q (N, K)
    and scale (N,) gathered by rows, q_t (K, N) by columns; scale_t is every rank's already. 1 byte per element of W
    per copy crosses the mesh (and 4 per row for the scales). A collective: every rank of the mesh calls it, with
    the same choice of copies. rows=False / transposed=False: that copy is not gathered (the local one is returned
    in its place), for a pass that reads only the other."""
    if torch.compiler.is_compiling():
        # The layout was checked eagerly when the layer was sharded (fsdp_shard_fp8_weights) and is refreshed
        # eagerly; traced, only the arithmetic (Dynamo cannot trace the placements' checks).
        per_rank = _rows_per_rank(weight)
    else:
        _, _, per_rank = _row_shard("weight", weight)
    group = weight.device_mesh.get_group()
    n, k = weight.shape
    q, scale, q_t = local.q, local.scale, local.q_t
    with torch.no_grad():
        if rows:
            # Rows gathered as columns of the transposed view, so that one helper pads the last dim of every piece.
            q = _all_gather_blocks(q.T, per_rank, group).permute(0, 2, 1).reshape(-1, k)[:n].contiguous()
            scale = _all_gather_blocks(scale, per_rank, group).reshape(-1)[:n].contiguous()
        if transposed:
            q_t = _all_gather_blocks(q_t, per_rank, group).permute(1, 0, 2).reshape(k, -1)[:, :n].contiguous()
    return FP8Weight(q, scale, q_t, local.scale_t)
