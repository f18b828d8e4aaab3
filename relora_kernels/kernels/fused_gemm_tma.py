"""The fused LoRA GEMM for Hopper: persistent, tensor-descriptor (TMA) loads, the LoRA branch in the epilogue.

    out = lhs @ rhs + low_scale * mask(low @ up) + bias

the op of `lora_linear.fused_matmul` (forward: lhs = x, rhs = W.T, low = S, up = B.T, no mask; input gradient:
lhs = dy, rhs = W, low = dS, up = A, the dropout mask of dx's (M, K) view, low_scale = 1/(1-p)).

What differs from `_fused_matmul_kernel`:
- persistent: grid = min(output tiles, SMs x blocks per SM); each program walks the tiles tile_id = pid,
  pid + programs, ... in the grouped (GROUP_M) order, so no wave quantisation and no per-tile launch cost;
- lhs and rhs are read through device-side tensor descriptors (`tl.make_tensor_descriptor`): TMA copies on sm_90,
  zero-filled past the edges, no address arithmetic or masks in the K loop;
- the low-rank term, the dropout mask and bias are applied after the K loop (epilogue): with warp specialisation
  the next tile's loads are issued while this tile's epilogue runs, instead of the mask's Philox rounds delaying the
  first load of every tile;
- `tl.range(..., warp_specialize=True)` on the tile loop, a tile option (WARP_SPECIALIZE) so it can be turned off.
  It needs num_warps=4 (see policy.TMA_TILES) and every tl.dot operand from a descriptor, so the low-rank tiles are
  read through descriptors where they are eligible, and warp specialisation is dropped where they are not (r = 17 in
  16 bits). What the sm_90 builds showed: docs/DESIGN.md section 10.
The accumulator is fp32 and is rounded once into the output's dtype.

The descriptors live in 128 B of global scratch per descriptor and program, which Triton takes from the allocator
of `triton.set_allocator` at every launch (see `_use_scratch_allocator`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime import _allocation

from . import policy
from .jit_helpers import grouped_tile, keep_mask
from .launch import dot_precision, dropout_args, on_tensors_device, traceable

# The tiles (policy.TMA_TILES, "... tma ws e1") and their shared memory (policy.gemm_shared_bytes) live with the
# other tiles in policy.py.

# The persistent grid assumes at most this many blocks per SM (benchmarks/gpu_build.py reports what the registers
# and shared memory of every candidate allow).
_MAX_BLOCKS_PER_SM = 2


def blocks_per_sm(tile: policy.GemmTile, rank_block: int, element_size: int) -> int:
    """Blocks of this tile one SM holds at once as the persistent grid counts them: by shared memory (every NVIDIA
    GPU with a per-block opt-in limit L has L + 1 KiB per SM, and the CUDA runtime reserves 1 KiB per resident block),
    at most _MAX_BLOCKS_PER_SM, at least 1."""
    per_sm = policy.shared_memory_limit() + 1024
    by_shared = per_sm // (policy.gemm_shared_bytes(tile, rank_block, element_size) + 1024)
    return max(1, min(_MAX_BLOCKS_PER_SM, by_shared))


def _programs(tiles: int, tile: policy.GemmTile, rank_block: int, element_size: int) -> int:
    """The persistent grid: one program per output tile up to the programs the GPU holds at once."""
    if policy.interpreting():
        return min(tiles, policy.INTERPRETER_PROGRAMS)
    return min(tiles, policy.multiprocessor_count() * blocks_per_sm(tile, rank_block, element_size))


# ---------------------------------------------------------------------------------------------------------------
# Eligibility and the descriptors' scratch
# ---------------------------------------------------------------------------------------------------------------

_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TMA_ALIGNMENT = 16  # bytes: of the base address and of every stride but the unit one
_TMA_MAX_STRIDE = 2**40  # bytes (cuTensorMapEncodeTiled)


def _base_address(tensor: torch.Tensor) -> int:
    """data_ptr, or where tracing has no data (torch.compile's fake tensors) the view's offset into a storage that
    torch's allocators align to 512 bytes."""
    return tensor.storage_offset() * tensor.element_size() if is_fake(tensor) else tensor.data_ptr()


def _tma_layout(tensor: torch.Tensor) -> bool | None:
    """How a descriptor reads this 2-D tensor: True along dim 1 (stride(1) == 1), False along dim 0 (the transpose,
    stride(0) == 1), None where TMA cannot (tma_eligible's rule)."""
    if tensor.dim() != 2 or tensor.dtype not in _TMA_DTYPES or _base_address(tensor) % _TMA_ALIGNMENT:
        return None
    along_cols = tensor.stride(1) == 1
    if not along_cols and tensor.stride(0) != 1:
        return None
    outer = tensor.stride(0 if along_cols else 1) * tensor.element_size()
    return along_cols if 0 < outer < _TMA_MAX_STRIDE and outer % _TMA_ALIGNMENT == 0 else None


def tma_eligible(lhs: torch.Tensor, rhs: torch.Tensor) -> bool:
    """Whether `fused_matmul_tma` can read lhs (M, K) and rhs (K, N) through TMA descriptors; the rule is the same
    for a tensor and its transpose. The exact rule, for each of the two:
    - dtype float16, bfloat16 or float32, 2-D;
    - one dimension contiguous: stride(1) == 1 (row-major: the descriptor is the tensor), or else stride(0) == 1
      (column-major: the descriptor is its transpose);
    - the other stride positive, a multiple of 16 bytes (of 8 elements in 16 bits, 4 in fp32) and < 2**40 bytes;
    - the base address (data_ptr, including a view's offset) a multiple of 16 bytes.
    So a contiguous x is eligible when K is a multiple of 8 (16-bit); x[:, 1:] of a 16-bit x is not (its base is
    2 bytes off); W.T is, through its transpose. Where this is False the pointer-load kernel runs instead.

    low (M, R) and up (R, N) need not be eligible: where both are (by the same rule: R a multiple of 8 in 16 bits
    for a contiguous S, B or A) they are read through descriptors too, otherwise by pointer loads, and then the
    kernel runs without warp specialisation whatever the tile asks (see the kernel)."""
    return _tma_layout(lhs) is not None and _tma_layout(rhs) is not None


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the descriptors: a torch allocation (stream-ordered in torch's caching allocator, from the
    graph's pool under CUDA-graph capture, 512 B aligned) on the current device, which `on_tensors_device` makes
    the tensors' own."""
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _use_scratch_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch unless one is set already (a user's, or Inductor's).

    Triton keeps the allocator in a ContextVar, so a setting made once at import would not reach other threads:
    autograd runs the backward (the dx launch) on its own device threads. Hence this check before every eager launch
    (a ContextVar get). Compiled graphs need nothing from here: Inductor's launcher sets its own torch allocator
    before every launch of a Triton kernel, user-defined (wrap_triton) ones included."""
    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _descriptor(ptr, rows, cols, stride_rows, stride_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                COLS_CONTIGUOUS: tl.constexpr):
    """A descriptor of the (rows, cols) matrix at ptr, running along its contiguous dimension (TMA needs the last
    stride to be 1): the matrix itself if COLS_CONTIGUOUS, else its transpose."""
    if COLS_CONTIGUOUS:
        return tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride_rows, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        return tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride_cols, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])


@triton.jit
def _load(desc, row, col, COLS_CONTIGUOUS: tl.constexpr):
    """The (BLOCK_ROWS, BLOCK_COLS) tile at (row, col) of _descriptor's matrix, zero past its edges."""
    if COLS_CONTIGUOUS:
        return desc.load([row, col])
    else:
        return tl.trans(desc.load([col, row]))


@triton.jit
def _fused_matmul_tma_kernel(
    lhs_ptr,  # (M, K)
    rhs_ptr,  # (K, N), described as its (N, K) transpose
    low_ptr,  # (M, R)
    up_ptr,  # (R, N), described as its (N, R) transpose
    bias_ptr,  # (N,), read only when HAS_BIAS
    out_ptr,  # (M, N) output
    seed_ptr,  # () int64 dropout seed, read only when APPLY_DROPOUT
    M, N, K, R,
    stride_lm, stride_lk,
    stride_rn, stride_rk,
    stride_low_m, stride_low_r,
    stride_un, stride_ur,
    stride_om, stride_on,
    stride_bias,
    low_scale, keep_threshold,
    LHS_K_CONTIGUOUS: tl.constexpr, RHS_K_CONTIGUOUS: tl.constexpr,
    LOW_TMA: tl.constexpr, LOW_R_CONTIGUOUS: tl.constexpr, UP_R_CONTIGUOUS: tl.constexpr,
    HAS_BIAS: tl.constexpr, APPLY_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    lhs_desc = _descriptor(lhs_ptr, M, K, stride_lm, stride_lk, BLOCK_M, BLOCK_K, LHS_K_CONTIGUOUS)
    rhs_desc = _descriptor(rhs_ptr, N, K, stride_rn, stride_rk, BLOCK_N, BLOCK_K, RHS_K_CONTIGUOUS)
    # Warp specialisation needs every tl.dot operand to come from a descriptor: Triton's warp-specialisation pass
    # rejects pointer-loaded ones.
    if LOW_TMA:
        low_desc = _descriptor(low_ptr, M, R, stride_low_m, stride_low_r, BLOCK_M, BLOCK_R, LOW_R_CONTIGUOUS)
        up_desc = _descriptor(up_ptr, N, R, stride_un, stride_ur, BLOCK_N // EPILOGUE_SPLIT, BLOCK_R,
                              UP_R_CONTIGUOUS)
    else:
        low_desc, up_desc = low_ptr, up_ptr  # unused
    seed = tl.load(seed_ptr) if APPLY_DROPOUT else 0
    operands = (up_desc, up_ptr, bias_ptr, out_ptr, seed, M, N, R, stride_un, stride_ur, stride_om, stride_on,
                stride_bias, tl.cast(low_scale, tl.float32),  # float scalars may arrive as fp64 (torch.compile)
                keep_threshold)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)

    # num_stages=2 of the tile loop: with warp specialisation the producer double-buffers the low-rank tiles
    # (this tile's and the next's) instead of keeping as many copies as the K loop has stages, which would leave
    # r = 64 without a warp-specialised tile that fits; the K loop keeps the tile's num_stages.
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0),
                            warp_specialize=WARP_SPECIALIZE, num_stages=2):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        # The K loop: TMA tiles, zero past the edges of M, N and K.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            lhs_tile = _load(lhs_desc, off_m, k0, LHS_K_CONTIGUOUS)
            rhs_tile = tl.trans(_load(rhs_desc, off_n, k0, RHS_K_CONTIGUOUS))
            acc = tl.dot(lhs_tile, rhs_tile, acc, input_precision=DOT_PRECISION)

        # The (BLOCK_M, r) low-rank tile, once for all the epilogue's slices.
        if LOW_TMA:
            low_tile = _load(low_desc, off_m, 0, LOW_R_CONTIGUOUS)
        else:
            rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * stride can pass 2**31
            low_tile = tl.load(
                low_ptr + rows[:, None] * stride_low_m + offs_r[None, :] * stride_low_r,
                mask=(rows[:, None] < M) & (offs_r[None, :] < R), other=0.0,
            )

        # Epilogue, in EPILOGUE_SPLIT column slices so that only a slice of the low-rank term (and of the mask) is
        # live beside the accumulator (a whole one beside a 128x128 accumulator spills at 4 warps).
        if EPILOGUE_SPLIT == 1:
            _epilogue(acc, low_tile, off_m, off_n, operands,
                      LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
        else:
            acc_0, acc_1 = _halves(acc, BLOCK_M, BLOCK_N)
            if EPILOGUE_SPLIT == 2:
                _epilogue(acc_0, low_tile, off_m, off_n, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
                _epilogue(acc_1, low_tile, off_m, off_n + BLOCK_N // 2, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
            else:
                acc_00, acc_01 = _halves(acc_0, BLOCK_M, BLOCK_N // 2)
                acc_10, acc_11 = _halves(acc_1, BLOCK_M, BLOCK_N // 2)
                _epilogue(acc_00, low_tile, off_m, off_n, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
                _epilogue(acc_01, low_tile, off_m, off_n + BLOCK_N // 4, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
                _epilogue(acc_10, low_tile, off_m, off_n + BLOCK_N // 2, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)
                _epilogue(acc_11, low_tile, off_m, off_n + 3 * BLOCK_N // 4, operands,
                          LOW_TMA, UP_R_CONTIGUOUS, HAS_BIAS, APPLY_DROPOUT, BLOCK_R, DOT_PRECISION)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right (BLOCK_M, BLOCK_N / 2) halves of acc."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, low_tile, off_m, off_n, operands,
              LOW_TMA: tl.constexpr, UP_R_CONTIGUOUS: tl.constexpr, HAS_BIAS: tl.constexpr,
              APPLY_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Store acc + low_scale * mask(low_tile @ up) + bias for the (BLOCK_M, BLOCK_N) slice of acc at
    (off_m, off_n), rounded once into the output's dtype. `operands`: the kernel's tensors, sizes and strides it
    needs."""
    (up_desc, up_ptr, bias_ptr, out_ptr, seed, M, N, R, stride_un, stride_ur, stride_om, stride_on, stride_bias,
     low_scale, keep_threshold) = operands
    BLOCK_M: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)  # M * stride can pass 2**31
    cols = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if LOW_TMA:
        up_tile = tl.trans(_load(up_desc, off_n, 0, UP_R_CONTIGUOUS))
    else:
        offs_r = tl.arange(0, BLOCK_R)
        up_tile = tl.load(  # (BLOCK_R, BLOCK_N) tile of up
            up_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
            mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0,
        )
    low_term = tl.dot(low_tile, up_tile, input_precision=DOT_PRECISION) * low_scale
    if APPLY_DROPOUT:
        keep = keep_mask(seed, rows, off_n, N, keep_threshold, BLOCK_M, BLOCK_N)
        low_term = tl.where(keep, low_term, 0.0)
    acc += low_term
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# ---------------------------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------------------------


@on_tensors_device
def fused_matmul_tma(lhs: torch.Tensor, rhs: torch.Tensor, low: torch.Tensor, up: torch.Tensor,
                     low_scale: float, bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None, *,
                     tile: policy.GemmTile) -> torch.Tensor:
    """out = lhs @ rhs + low_scale * mask(low @ up) + bias, (M, N) in lhs's dtype: the semantics and
    arguments of `lora_linear.fused_matmul` (lhs (M, K), rhs (K, N), low (M, R), up (R, N), bias (N,) or None,
    the keep-mask of the (M, N) output drawn from `seed` (a 0-d int64 tensor, None without dropout) when
    dropout_p > 0), already validated by functional.py.

    `tile` is one of policy.TMA_TILES (policy.tma_tiles gives those that fit), policy.INTERPRETER_TMA_TILE under the
    interpreter; it is used as given (the caller checks the fit). lhs and rhs must pass `tma_eligible` (a
    ValueError otherwise); low, up and bias may have any strides."""
    if not tma_eligible(lhs, rhs):
        raise ValueError("fused_matmul_tma: lhs and rhs must be TMA-eligible (tma_eligible: one unit stride, the "
                         "other and the base address 16-byte aligned); use the pointer-load kernel")
    (M, K), N, R = lhs.shape, rhs.shape[1], low.shape[1]
    # The kernel describes rhs and up as their (N, K) and (N, R) transposes, K (resp. R) contiguous where the
    # transpose's rows are: _tma_layout of the transpose is the negation of the tensor's own.
    low_layout, up_layout = _tma_layout(low), _tma_layout(up)
    low_tma = low_layout is not None and up_layout is not None
    out = torch.empty((M, N), device=lhs.device, dtype=lhs.dtype)
    if M == 0 or N == 0:
        return out
    rank_block = policy.block_rank(R)
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
    grid = (_programs(tiles, tile, rank_block, lhs.element_size()),)
    if lhs.device.type == "cuda":
        _use_scratch_allocator()
    traceable(_fused_matmul_tma_kernel)[grid](
        lhs_ptr=lhs, rhs_ptr=rhs, low_ptr=low, up_ptr=up, bias_ptr=bias if bias is not None else lhs, out_ptr=out,
        M=M, N=N, K=K, R=R,
        stride_lm=lhs.stride(0), stride_lk=lhs.stride(1),
        stride_rn=rhs.stride(1), stride_rk=rhs.stride(0),
        stride_low_m=low.stride(0), stride_low_r=low.stride(1),
        stride_un=up.stride(1), stride_ur=up.stride(0),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        low_scale=float(low_scale),
        LHS_K_CONTIGUOUS=_tma_layout(lhs), RHS_K_CONTIGUOUS=_tma_layout(rhs) is False,
        LOW_TMA=low_tma, LOW_R_CONTIGUOUS=bool(low_layout), UP_R_CONTIGUOUS=up_layout is False,
        HAS_BIAS=bias is not None, BLOCK_R=rank_block, DOT_PRECISION=dot_precision(lhs.dtype),
        **dropout_args(dropout_p, seed, lhs),
        **{**tile.launch_options, "WARP_SPECIALIZE": tile.warp_specialize and low_tma},
    )
    return out
