"""`@triton.jit` device functions that kernels of more than one module call: the dropout keep-mask and the grouped
order of output tiles. Triton inlines them into each kernel that calls them."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import random_stream

_RANDOM_SHIFT = tl.constexpr(random_stream.RANDOM_SHIFT)


@triton.jit
def keep_mask(seed, rows, col_start, cols, keep_threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask of the tile `rows` (int64, BLOCK_ROWS) x [col_start, col_start + BLOCK_COLS) of an (M, cols)
    matrix, col_start a multiple of 4 (same stream as reference.dropout_bits).

    Element (m, k) takes word k % 4 of the Philox draw counted m * cdiv(cols, 4) + k // 4: one draw of ten rounds
    serves four neighbours, because one per element made the mask cost more than the kernels' memory traffic
    (docs/DESIGN.md section 10)."""
    groups = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    w0, w1, w2, w3 = tl.randint4x(seed, rows[:, None] * tl.cdiv(cols, 4) + groups[None, :])
    # tl.join stacks along a new minor dimension, so element [m, g, i, j] of join(join(w0, w2), join(w1, w3)) is
    # word 2i + j; flattened row-major, column 4g + w holds word w.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_ROWS, BLOCK_COLS))
    return (words >> _RANDOM_SHIFT).to(tl.int32) >= keep_threshold


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `tile_id`: GROUP_M row blocks share their rhs column blocks while
    those are still in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n
