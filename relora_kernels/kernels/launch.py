"""Launching a compiled kernel without Triton's per-call binding (docs/DESIGN.md section 8).

`kernel[grid](**kwargs)` binds the arguments, computes their specialisation (alignment of every pointer, integers
equal to 1 or divisible by 16), builds a cache key, looks the compiled kernel up and calls its launcher: ~37 us of
host time per launch on a 2-vCPU x86 VM (triton 3.9), against ~1 us for the launcher call alone. The fused op makes
4-5 launches per training step of each layer, so the binding alone would cost more than the eager LoRA it replaces.

A `LaunchSite` is one place a kernel is launched from. Everything a launch passes besides its pointers (shapes,
strides, scalars, constexprs, the grid and the tile) is computed once per key by the site's `configure`, which sees
nothing but the key, so the key holds all it depends on. The first launch of each specialisation (the pointers'
dtypes and 16-byte alignment on top of the key) goes through `kernel[grid]`, Triton's own launch, compiling if
needed; later ones call the compiled kernel's launcher directly, with the arguments in the order Triton passes them.
So a changed stride, shape or alignment is a new key, which Triton then resolves itself. Working the
specialisation out costs ~2.3 us per launch of 9 pointers; a caller that knows its pointers are all 16-byte aligned
(a planned eager pass, which tests its inputs once: `aligned_launches_apply`) launches through the key's
`AlignedLaunch` instead, which keeps that one specialisation's kernel: every site's key fixes the dtypes of the
pointers its callers pass. Launch hooks (a profiler's) take Triton's own path, as do the interpreter and tracing
(`torch.library.wrap_triton`), where every launch is configured anew.

Beside it, what every launcher of the kernel modules shares: `traceable` (how a kernel is launched, fixed at import),
`on_tensors_device`, `dot_precision`, `dropout_args` and `launch_options`. This module imports no kernel module, so
each of them can import it.
"""

from __future__ import annotations

import functools

import torch
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from triton import knobs
from triton.runtime import driver

from .._backend import interpreting
from ..random_stream import dropout_threshold

# Whether ops.py registers the launchers as triton_ops, which torch.compile traces into, or as opaque custom ops:
# the latter under the interpreter, whose kernels torch cannot trace. Fixed at import, as the registration is.
TRACEABLE_LAUNCHES = not interpreting()


def traceable(kernel):
    """`kernel` in the form every launch uses: wrapped for tracing where the ops are triton_ops, else itself. Outside
    tracing (a triton_op run eagerly, or functional.py's eager path, which switch the wrapping off) the kernel itself,
    without calling torch's wrapper, whose imports and checks cost microseconds on every launch."""
    return torch.library.wrap_triton(kernel) if TRACEABLE_LAUNCHES and is_wrap_triton_enabled() else kernel


def on_tensors_device(launcher):
    """Run `launcher` with its first tensor's CUDA device current: Triton launches on the current device, which
    need not be the one the tensors are on."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        if not off_current_device(first):
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return launch


def off_current_device(t: torch.Tensor) -> bool:
    """Whether `t` is on a CUDA device other than the current one, where a launch would go: on_tensors_device's test,
    which the eager passes (kernels/passes.py) make themselves rather than pay a wrapper's call on every call.
    `is_cuda` and `get_device()` read the tensor in C; `t.device.type` builds a device and a string on every call."""
    return t.is_cuda and t.get_device() != torch.cuda.current_device()


# torch.backends.cuda.matmul.fp32_precision's own getter (torch >= 2.9), called directly: the attribute goes through
# a Python __getattr__ on every read.
_fp32_matmul_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own matmul setting (full fp32 unless TF32 was allowed); 16-bit ones ignore it.
    `fp32_precision` (torch >= 2.9) reflects the legacy `allow_tf32` and `set_float32_matmul_precision` as well,
    whereas reading `allow_tf32` raises once the new API has been used. Every plan key asks it: one frame."""
    if dtype != torch.float32:
        return "tf32"
    if _fp32_matmul_precision is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32" if _fp32_matmul_precision("cuda", "matmul") == "tf32" else "ieee"


def dropout_args(dropout_p: float, seed: torch.Tensor | None, fallback: torch.Tensor) -> dict:
    """Kernel arguments of the dropout mask. Without dropout the seed is never read and `fallback` stands in for it;
    placeholders like it are always inputs the kernel does not write, so that torch.compile's analysis of what a
    kernel mutates never sees one buffer both written and passed again."""
    return {
        "seed_ptr": seed if dropout_p > 0.0 else fallback,
        "keep_threshold": dropout_threshold(dropout_p),
        "APPLY_DROPOUT": dropout_p > 0.0,
    }


def launch_options(config: dict) -> dict:
    """The launch options of a config (num_warps, num_stages), where it sets them."""
    return {name: config[name] for name in ("num_warps", "num_stages") if name in config}

# Plans per site before its cache is emptied: a varying integer argument (a ReLoRA seed, a token count) must not
# grow it without bound; a miss costs one configuration and one ordinary launch.
CACHE_LIMIT = 4096


def remember(cache: dict, key, value):
    """cache[key] = value, emptying `cache` first when it holds CACHE_LIMIT entries; returns value."""
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def static_ints(value):
    """`value` (an int, or nested tuples of them, as a launch key or a shape) with every SymInt made an int. Traced
    with dynamic shapes (torch.compile(dynamic=True), AOTAutograd's dynamic checks) a launcher reads symbolic sizes,
    which can neither key a cache nor choose a tile or a constexpr; int() specialises the graph on each one (a guard
    that recompiles for another size), as a compiled kernel's launch needs them known."""
    if isinstance(value, tuple):
        return tuple(static_ints(v) for v in value)
    return int(value) if isinstance(value, torch.SymInt) else value


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: triton.cdiv is a constexpr function costing microseconds per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def eager_launches():
    """Within the block the launchers launch as functional.py's eager path does: without torch's tracing wrapper
    (`torch.library.wrap_triton`), whose dispatch outside a triton_op costs ~380 us of host time per launch. For
    callers of the launchers themselves (the benchmarks' per-launch rows)."""
    return set_wrap_triton_enabled(False)


class _Compiled:
    """What the launch of one specialisation needs: the kernel's launcher and its handles."""

    __slots__ = ("run", "function", "packed_metadata")

    def __init__(self, compiled):
        self.run, self.function, self.packed_metadata = compiled.run, compiled.function, compiled.packed_metadata


class BoundLaunch:
    """One key's launches from a site: its grid, the arguments after the pointers and the launch options, computed
    once, and the compiled kernel of each specialisation seen. Calling it with the pointers launches. The passes keep
    one per launch of a call's plan (kernels/passes.py), so a planned call pays neither the key nor its lookup."""

    __slots__ = ("site", "key", "grid", "tail", "options", "compiled", "_grid_yz", "aligned")

    def __init__(self, site: LaunchSite, key: tuple):
        self.site, self.key = site, key
        grid, scalars, options = site.configure(*key)
        self.grid, self.options, self.compiled = grid, options, {}
        names = site.kernel.arg_names
        tail_names = names[len(names) - len(scalars):]
        if set(tail_names) != set(scalars):  # a configure that does not give exactly the arguments after the pointers
            raise ValueError(f"{site.kernel.__name__}: the arguments after the pointers are {tail_names}, "
                             f"configure gave {sorted(scalars)}")
        self.tail = tuple(scalars[name] for name in tail_names)
        self._grid_yz = (grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.aligned = AlignedLaunch(self)

    def __call__(self, pointers: tuple) -> None:
        if _launch_hooked():
            self.site.kernel[self.grid](*pointers, *self.tail, **self.options)
            return
        device = driver.active.get_current_device()
        specialisation = _specialisation(device, pointers)
        compiled = self.compiled.get(specialisation)
        if compiled is None:
            self._compile_and_launch(specialisation, pointers)
            return
        self._run(compiled, driver.active.get_current_stream(device), pointers)

    def _compile_and_launch(self, specialisation: tuple, pointers: tuple) -> _Compiled:
        """Triton's own launch, which compiles the specialisation where it must; its compiled kernel kept."""
        compiled = _Compiled(self.site.kernel[self.grid](*pointers, *self.tail, **self.options))
        self.compiled[specialisation] = compiled
        return compiled

    def _run(self, compiled: _Compiled, stream, pointers: tuple) -> None:
        compiled.run(self.grid[0], *self._grid_yz, stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *pointers, *self.tail)


def _specialisation(device, pointers: tuple) -> tuple:
    """What Triton specialises a compiled kernel on beyond the key: each pointer's dtype and 16-byte alignment."""
    return (device, *[(t.dtype, t.data_ptr() % 16 == 0) for t in pointers])


def _launch_hooked() -> bool:
    """Whether a launch hook is set, then every launch goes through Triton's own path, which calls it: Triton's hooks
    are chains (triton >= 3.5: empty unless a profiler adds to them), older ones None or a function. Asked once per
    planned pass (aligned_launches_apply) and by each launch that takes Triton's own path, so in one frame."""
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return ((enter is not None and bool(getattr(enter, "calls", True)))
            or (leave is not None and bool(getattr(leave, "calls", True))))


def aligned_launches_apply(*tensors: torch.Tensor | None) -> bool:
    """Whether a planned pass given these inputs may start its launches as AlignedLaunches: every tensor (None
    skipped) starts on a 16-byte boundary, as Triton's default specialisation of a pointer asks, and no launch hook
    is set (a hook asks for Triton's own launch path, which calls it). One test per pass, not per launch."""
    address = 0
    for t in tensors:
        if t is not None:
            address |= t.data_ptr()
    return address % 16 == 0 and not _launch_hooked()


class AlignedLaunch:
    """A BoundLaunch for callers that know every pointer they pass is 16-byte aligned, and whose key fixes every
    pointer's dtype (each LaunchSite's key holds the dtypes its callers' operands share): the compiled kernel of
    that one specialisation, found by the first launch, started without working the specialisation out per pointer
    (~2.3 us of host time per launch for 9 pointers). The planned eager passes (kernels/passes.py) test their inputs
    (and that no launch hook is set) with `aligned_launches_apply` once per call; what they allocate, the allocators
    align."""

    __slots__ = ("bound", "compiled")

    def __init__(self, bound: BoundLaunch):
        self.bound, self.compiled = bound, None

    def __call__(self, pointers: tuple) -> None:
        compiled = self.compiled
        if compiled is None:
            self._first(pointers)
            return
        # BoundLaunch._run, inline: a frame less on every planned launch.
        bound, active = self.bound, driver.active
        compiled.run(bound.grid[0], *bound._grid_yz, active.get_current_stream(active.get_current_device()),
                     compiled.function, compiled.packed_metadata, None, None, None, *pointers, *bound.tail)

    def _first(self, pointers: tuple) -> None:
        bound = self.bound
        if _launch_hooked():
            bound(pointers)
            return
        specialisation = _specialisation(driver.active.get_current_device(), pointers)
        if not all(aligned for _, aligned in specialisation[1:]):
            raise ValueError(f"{bound.site.kernel.__name__}: an AlignedLaunch was given a pointer that is not 16-byte "
                             f"aligned; the caller must launch it through its BoundLaunch")
        compiled = bound.compiled.get(specialisation)
        if compiled is None:
            self.compiled = bound._compile_and_launch(specialisation, pointers)
            return
        self.compiled = compiled
        self(pointers)


class _TracedLaunch:
    """A key's launches where every launch is configured anew and made by name: through tracing's wrapper or the
    interpreter, which have no compiled launcher to call."""

    __slots__ = ("site", "key", "traceable_kernel")

    def __init__(self, site: LaunchSite, key: tuple, traceable_kernel):
        self.site, self.key, self.traceable_kernel = site, key, traceable_kernel

    @property
    def aligned(self) -> _TracedLaunch:
        """Itself: every launch is configured and specialised anew (BoundLaunch.aligned's counterpart)."""
        return self

    def __call__(self, pointers: tuple) -> None:
        grid, scalars, options = self.site.configure(*self.key)
        names = self.site.kernel.arg_names[:len(pointers)]
        self.traceable_kernel[grid](**dict(zip(names, pointers, strict=True)), **scalars, **options)


class LaunchSite:
    """A place a kernel is launched from, whose launches' non-tensor arguments are a function of a key: `configure(
    *key)` gives (grid, the arguments after the pointers by name, launch options), computed once per key. A launch
    passes the key and the kernel's leading pointer arguments in order.

    Through `traceable_kernel` (tracing's wrapper, the interpreter's function, a build-only stand-in) every launch
    is configured anew and made by name. Otherwise the key's `BoundLaunch` is cached, and each compiled
    specialisation (the pointers' dtypes and 16-byte alignment: the rest is fixed by the key) is started by its
    launcher directly."""

    def __init__(self, kernel, configure):
        self.kernel, self.configure = kernel, configure
        self.plans: dict[tuple, BoundLaunch] = {}

    def bind(self, traceable_kernel, key: tuple) -> BoundLaunch | _TracedLaunch:
        """The launch of `key`, to be called with the pointers (as often as wanted, while the key holds)."""
        if traceable_kernel is not self.kernel or _interpreted(self.kernel):
            return _TracedLaunch(self, static_ints(key), traceable_kernel)
        bound = self.plans.get(key)
        return bound if bound is not None else remember(self.plans, key, BoundLaunch(self, key))

    def launch(self, traceable_kernel, key: tuple, pointers: tuple) -> None:
        self.bind(traceable_kernel, key)(pointers)


def _interpreted(kernel) -> bool:
    """A kernel run by Triton's interpreter (TRITON_INTERPRET=1) has no compiled launcher."""
    return not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction"

