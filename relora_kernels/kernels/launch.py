"""Launching a compiled kernel without Triton's per-call binding (docs/DESIGN.md section 8).

`kernel[grid](**kwargs)` binds the arguments, computes their specialisation (alignment of every pointer, integers
equal to 1 or divisible by 16), builds a cache key, looks the compiled kernel up and calls its launcher: ~37 us of
host time per launch on a 2-vCPU x86 VM (triton 3.9), against ~1 us for the launcher call alone. The fused op makes
4-5 launches per training step of each layer, so the binding alone would cost more than the eager LoRA it replaces.

`launch` keeps its own cache: the first launch of each specialisation goes through `kernel[grid]` (compiling if
needed) and is remembered by its `specialisation_key`; later ones call the compiled kernel's launcher directly,
with the arguments in the order Triton itself passes them. The key holds every argument that can change what Triton
compiles: integers, booleans, strings and None exactly, a tensor by its dtype and whether its address is 16-byte
aligned; floats are kept exactly too (Triton never specialises on a float's value, but the op's floats are
constants of a layer, so they cost no misses). So a changed stride, shape or alignment
is a new key, which Triton then resolves itself. Launch hooks (a profiler's) take Triton's own path, as do the
interpreter and tracing (`torch.library.wrap_triton`).
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver

# Entries per kernel before the cache is emptied: a varying integer argument (a ReLoRA seed, a token count) must
# not grow it without bound; a miss costs one ordinary launch.
CACHE_LIMIT = 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: triton.cdiv is a constexpr function costing microseconds per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def specialisation_key(args: tuple) -> tuple:
    """What of `args` can change the compiled kernel: the leading run of tensors (the pointers) by dtype and 16-byte
    alignment, every argument after it exactly (a tensor there hashes by identity: no later launch matches it, so it
    always takes Triton's own path)."""
    pointers = 0
    for arg in args:
        if not isinstance(arg, torch.Tensor):
            break
        pointers += 1
    return args[pointers:], tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in args[:pointers]])


class _Compiled:
    """What the launch of one specialisation needs: the kernel's launcher and its handles."""

    __slots__ = ("run", "function", "packed_metadata")

    def __init__(self, compiled):
        self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata


_caches: dict[int, dict[tuple, _Compiled]] = {}  # kernels are module constants: ids stay theirs


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton's hooks are chains (empty unless a profiler adds to them), older ones
    None or a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple, args: tuple, options: tuple = ()) -> None:
    """Launch the @triton.jit `kernel` on `grid` with `args`, every parameter of the kernel in its order (constexprs
    included), and `options` the launch options as (name, value) pairs (num_warps, num_stages)."""
    if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        kernel[grid](*args, **dict(options))
        return
    cache = _caches.get(id(kernel))  # by id: hashing a JITFunction builds its cache key
    if cache is None:
        cache = _caches.setdefault(id(kernel), {})
    device = driver.active.get_current_device()
    key = (device, options, specialisation_key(args))
    compiled = cache.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **dict(options))  # Triton binds, specialises, compiles if needed, launches
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[key] = _Compiled(compiled)
        return
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *args)
