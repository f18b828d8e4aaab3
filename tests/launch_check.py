"""Run by tests/test_launch.py without the interpreter (TRITON_INTERPRET=0): the kernels are compiled for sm_90 by
Triton's own compiler against a stand-in driver whose launcher records its arguments instead of launching.

Checks that kernels/launch.py's LaunchSite, which calls a compiled kernel's launcher itself after the first launch
of each specialisation, passes exactly what Triton's own `kernel[grid](...)` passes, and that an operand whose
alignment or unit stride differs from a cached launch selects the kernel Triton compiles for it. Prints one JSON
line.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch._library.triton import set_wrap_triton_enabled

assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"

import relora_kernels as rk  # noqa: E402
from benchmarks.host_overhead import stubbed_launches  # noqa: E402 (after the check above)
from relora_kernels.kernels import lora_linear, passes  # noqa: E402

RECORDED: list[tuple] = []
HOOKS_PASSED: list[bool] = []


class _RecordingLaunch:
    def __init__(self, src, metadata):
        self.name = src.name if hasattr(src, "name") else str(src)

    def __call__(self, *args):
        # grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook, the arguments
        RECORDED.append((id(self), args[:3], args[9:]))
        HOOKS_PASSED.append(args[7] is not None)  # the launch-enter hook Triton's own launch hands its launcher


def _same(a, b) -> bool:
    """The same argument as the launcher reads it: a tensor by its address and dtype (its strides are arguments of
    their own; a planned launch may pass W where Triton's passed W.T), anything else by value and type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                and a.dtype == b.dtype)
    return type(a) is type(b) and a == b


def main() -> int:
    results = {}
    # As functional.py's eager path calls the launchers: outside tracing, without torch's kernel wrapper.
    with stubbed_launches(), set_wrap_triton_enabled(False):
        from triton.runtime import driver

        driver.active.launcher_cls = _RecordingLaunch
        torch.manual_seed(0)
        M, K, R = 64, 48, 16
        buffer = torch.randn(M * K + 4)
        aligned = buffer[: M * K].view(M, K)
        misaligned = buffer[1: M * K + 1].view(M, K)  # 4 bytes off: not 16-byte aligned
        column_major = torch.randn(K, M).T  # unit stride on the other axis
        lora_a = torch.randn(R, K)
        seed = torch.tensor(7)

        def run(x):
            """(the launcher's recorded call, through launch.py's cache) after a first launch that fills it."""
            RECORDED.clear()
            lora_linear.lora_shrink(x, lora_a, 0.1, seed)  # the first launch of this specialisation: Triton's path
            lora_linear.lora_shrink(x, lora_a, 0.1, seed)  # launch.py's own call of the compiled launcher
            return RECORDED[0], RECORDED[1]

        calls = {}
        for name, x in (("aligned", aligned), ("misaligned", misaligned), ("column_major", column_major)):
            triton_path, cached_path = run(x)
            # Same compiled kernel (one launcher object per compiled kernel), same grid, same arguments except the
            # freshly allocated output S, which is a new tensor on every call.
            same_args = _same_arguments(triton_path[2], cached_path[2])
            calls[name] = triton_path[0]
            results[name] = {"same_launcher": triton_path[0] == cached_path[0], "same_grid": triton_path[1] ==
                             cached_path[1], "same_args": same_args, "arguments": len(cached_path[2])}
        results["distinct_kernels"] = len(set(calls.values())) == len(calls)
        results["cache_entries"] = sum(len(plan.compiled) for plan in lora_linear._SHRINK.plans.values())

        # The eager pass's plan (kernels/passes.py) is keyed by shapes and strides, not alignment: a planned call
        # whose x is 4 bytes off must still get the kernel compiled for that alignment, through the plan's launches.
        weight, lora_b = torch.randn(80, K), torch.randn(80, R)
        with rk.settings(backend="triton", autotune=False, engine="triton"):
            launchers = {}
            for name, x in (("first", aligned), ("planned", aligned), ("planned_misaligned", misaligned)):
                RECORDED.clear()
                passes.eager_forward(x, weight, lora_a, lora_b, 0.5, None, 0.1, seed,
                                     passes.forward_key(x, weight, lora_a, lora_b, None, 0.5, 0.1))
                launchers[name] = [call[0] for call in RECORDED]  # the shrink's launcher, then the GEMM's
        results["plan"] = {"launches": [len(v) for v in launchers.values()],
                           "planned_same_kernels": launchers["planned"] == launchers["first"],
                           "misaligned_other_shrink": launchers["planned_misaligned"][0] != launchers["planned"][0]}

        # Every launch a planned eager call makes, bf16 and FP8, forward and backward: the plan's own call of each
        # compiled launcher passes what the key's first (unplanned) call passed, which went through Triton's own
        # launch for each new specialisation (shapes used nowhere above, so each is new). Outputs are allocated
        # afresh per call: those compare by shape, stride and dtype; inputs and scalars must be the same.
        Mp, Kp, Np, Rp = 48, 64, 32, 8
        x, dy = torch.randn(Mp, Kp), torch.randn(Mp, Np)
        weight, lora_a, lora_b = torch.randn(Np, Kp), torch.randn(Rp, Kp), torch.randn(Np, Rp)
        frozen = rk.quantize_fp8_weight(weight)
        from relora_kernels.kernels import passes_fp8

        passes_by_op = {
            "lora_linear": (lambda: passes.eager_forward(x, weight, lora_a, lora_b, 0.5, None, 0.1, seed,
                                     passes.forward_key(x, weight, lora_a, lora_b, None, 0.5, 0.1)),
                            lambda shrunk, plan: passes.eager_backward(dy, x, weight, lora_a, lora_b, shrunk, 0.5, 0.1,
                                                                      seed, True, False, False, plan)),
            "lora_linear_fp8": (
                lambda: passes_fp8.eager_forward_fp8(
                    x, frozen.q, frozen.scale, lora_a, lora_b, 0.5, None, 0.1, seed,
                    passes_fp8.forward_key(x, frozen, lora_a, lora_b, None, 0.5, 0.1)),
                lambda shrunk, plan: passes_fp8.eager_backward_fp8(dy, x, frozen.q_t, frozen.scale_t, lora_a, lora_b,
                                                                  shrunk, 0.5, 0.1, seed, True, False, False, plan))}
        with rk.settings(backend="triton", autotune=False, engine="triton"):
            for name, (forward, backward) in passes_by_op.items():
                recorded = {}
                for call in ("first", "planned"):
                    RECORDED.clear()
                    _, shrunk, plan = forward()
                    backward(shrunk, plan)
                    recorded[call] = list(RECORDED)
                first, planned = recorded["first"], recorded["planned"]
                results[f"planned {name}"] = {
                    "launches": len(planned),
                    "same_launches": len(first) == len(planned) and all(
                        a[0] == b[0] and a[1] == b[1] and _same_arguments(a[2], b[2])
                        for a, b in zip(first, planned, strict=True))}

        # A planned call whose inputs are all aligned starts each plan's compiled kernel without working out its
        # specialisation (launch.AlignedLaunch): that kernel must be the one of the operands' dtype and alignment.
        # The same shapes in fp16, then bf16 (whose keys differ from fp16's by the dtype alone: both dot in tf32)
        # after fp32 get their own kernels, planned or not; a planned backward whose dy is 4 bytes off gets the
        # kernels compiled for that alignment, and the aligned call after it fp32's again.
        def fwd_bwd_launchers(dtype, grad_y=None):
            cast = [t.to(dtype) for t in (x, dy, weight, lora_a, lora_b)]
            x_, dy_, weight_, lora_a_, lora_b_ = cast
            RECORDED.clear()
            _, shrunk, plan = passes.eager_forward(x_, weight_, lora_a_, lora_b_, 0.5, None, 0.1, seed,
                                                  passes.forward_key(x_, weight_, lora_a_, lora_b_, None, 0.5, 0.1))
            passes.eager_backward(dy_ if grad_y is None else grad_y, x_, weight_, lora_a_, lora_b_, shrunk, 0.5, 0.1,
                                  seed, True, False, False, plan)
            return [call[0] for call in RECORDED]

        dy_buffer = torch.randn(Mp * Np + 4)
        dy_misaligned = dy_buffer[1: Mp * Np + 1].view(Mp, Np)
        with rk.settings(backend="triton", autotune=False, engine="triton"):
            fp32 = fwd_bwd_launchers(torch.float32)
            fp16 = [fwd_bwd_launchers(torch.float16) for _ in range(2)]  # unplanned, then planned
            bf16 = [fwd_bwd_launchers(torch.bfloat16) for _ in range(2)]
            misaligned_dy = [fwd_bwd_launchers(torch.float32, dy_misaligned) for _ in range(2)]
            fp32_again = fwd_bwd_launchers(torch.float32)
        results["aligned launches"] = {
            "planned_are_their_own": [fp16[1] == fp16[0], bf16[1] == bf16[0]],
            "no_kernel_shared_across_dtypes": not (set(fp16[1]) & set(fp32) or set(bf16[1]) & set(fp16[1] + fp32)),
            # the forward's two launches and the dA launch (which does not read dy) are fp32's own kernels; the dB
            # launch and the input gradient's GEMM read dy: the kernels compiled for its alignment
            "misaligned_dy_same": [run[:2] + run[3:4] == fp32[:2] + fp32[3:4] for run in misaligned_dy],
            "misaligned_dy_other": [run[2] != fp32[2] and run[4] != fp32[4] for run in misaligned_dy],
            "fp32_again_same": fp32_again == fp32}

        # The eager restart (merge.merge_and_reinit_eagerly) takes its AlignedLaunches where W, A and B are aligned:
        # each dtype at the same shapes gets its own merge and reinit kernels, twice the same; an A 4 bytes off gets
        # the kernels compiled for that alignment, and the aligned call after it the first ones again.
        from relora_kernels.kernels import merge

        a_buffer = torch.randn(Rp * Kp + 4)

        def restart_launchers(dtype, misaligned_a=False):
            w, a, b = (t.to(dtype) for t in (weight, lora_a, lora_b))
            if misaligned_a:
                a = a_buffer.to(dtype)[1: Rp * Kp + 1].view(Rp, Kp)
            RECORDED.clear()
            merge.merge_and_reinit_eagerly(w, a, b, 0.5, 3)
            return [call[0] for call in RECORDED]

        with rk.settings(backend="triton", autotune=False):
            restarts = {dtype: [restart_launchers(dtype) for _ in range(2)]
                        for dtype in (torch.float32, torch.float16, torch.bfloat16)}
            misaligned_a = restart_launchers(torch.float32, misaligned_a=True)
            fp32_again = restart_launchers(torch.float32)
        firsts = [runs[0] for runs in restarts.values()]
        results["restart launches"] = {
            "launches": [len(run) for runs in restarts.values() for run in runs],
            "same_twice": [runs[0] == runs[1] for runs in restarts.values()],
            "no_kernel_shared_across_dtypes": len({k for run in firsts for k in run}) == sum(map(len, firsts)),
            "misaligned_a_other": [k != fp32 for k, fp32 in zip(misaligned_a, firsts[0], strict=True)],
            "fp32_again_same": fp32_again == firsts[0]}

        # A launch hook (a profiler's) must see every launch of a planned call: with one set, the aligned launches
        # take Triton's own path, which hands the hook to the launcher; without, the planned path passes none.
        from triton import knobs

        def hooked_launches(hook):
            previous = knobs.runtime.launch_enter_hook
            chain = hasattr(previous, "add")  # a HookChain (triton >= 3.5), else the hook itself or None
            if hook is not None:
                previous.add(hook) if chain else setattr(knobs.runtime, "launch_enter_hook", hook)
            try:
                HOOKS_PASSED.clear()
                fwd_bwd_launchers(torch.float32)
                return list(HOOKS_PASSED)
            finally:
                if hook is not None:
                    previous.remove(hook) if chain else setattr(knobs.runtime, "launch_enter_hook", previous)

        seen = []
        with rk.settings(backend="triton", autotune=False, engine="triton"):
            results["launch hooks"] = {"hooked": hooked_launches(lambda metadata: seen.append(metadata)),
                                       "unhooked": hooked_launches(None)}

        # An AlignedLaunch whose first launch is handed a pointer off 16-byte alignment refuses it (its caller must
        # take the BoundLaunch), rather than keeping that kernel for aligned ones.
        from relora_kernels.kernels.launch import AlignedLaunch

        bound = lora_linear.shrink_launch(misaligned, lora_a, 0.1)
        shrunk = torch.empty(M, R)
        try:
            AlignedLaunch(bound)((misaligned, lora_a, shrunk, seed, misaligned, misaligned, misaligned, misaligned,
                                  misaligned))
            results["aligned_launch_refuses_misaligned"] = False
        except ValueError as error:
            results["aligned_launch_refuses_misaligned"] = "not 16-byte aligned" in str(error)
    print(json.dumps(results))
    return 0


def _same_arguments(first: tuple, planned: tuple) -> bool:
    return len(first) == len(planned) and all(
        _same(a, b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                        and a.stride() == b.stride() and a.dtype == b.dtype)
        for a, b in zip(first, planned, strict=True))


if __name__ == "__main__":
    sys.exit(main())
