"""The GPU time model of PERF_NOTES.md ("Which engine", its "Corrections" and the FP8 predictions) as code:
predictions, not measurements.

Every launch of one LoRALinear fwd+bwd is priced from its bytes or FLOPs and the H200 rates below, with an
optimistic and a pessimistic bound (`Bounds.low`, `Bounds.high`). The launch lists here must match what the op
really launches: `benchmarks/test_gpu_build.py` traces a training step for sm_90 and compares its kernels and its
small ATen kernels with `TRITON_KERNELS` and `SMALL_KERNELS_PER_STEP`, and `benchmarks/test_time_model.py` checks
that PERF_NOTES states what this module computes and that the report's merge goal is reachable under it.

    python -m benchmarks.time_model      # the headline's predicted ratios and the merge's reachable copy fraction
"""

from __future__ import annotations

from dataclasses import dataclass

US = 1e-6
BF16, FP32 = 2, 4  # bytes an element: the operands, the fp32 gradient accumulators

# The rates (H200): cuBLAS bf16 at 8192^3 as recorded for the project's H200 machines (78-81 % of the 989 TFLOP/s
# peak), a device-to-device copy's bandwidth on them, the Triton GEMMs' fraction of cuBLAS (pointer tiles, Triton's
# own H100 figures) and the TMA tiles' gain over them, the fixed cost of one launch, the dropout mask's issue time.
CUBLAS_FLOPS = (798e12, 769e12)  # (optimistic, pessimistic)
COPY_BYTES_PER_S = 4.3e12
EAGER_BANDWIDTH_FRACTION = (1.0, 0.7)  # eager's memory-bound launches at copy bandwidth, or at 0.7 of it
TRITON_GEMM_FRACTION = (0.80, 0.76)
TMA_GAIN = 1.13
LAUNCH_US = 3.0
MERGE_LAUNCH_US = (2.0, 3.0)  # launch, ramp-up, tail of one memory-bound launch with no host cost
MASK_PASS_S = 0.025e-3  # ~25 instructions per element of an 8192 x 4096 mask, 132 SMs x 4 issues x 1.98 GHz
SMALL_KERNEL_US = 2.5  # a launch-bound ATen kernel (seed draw, zeros, casts)

# FP8 frozen weights (the `fp8_` engines): both frozen GEMMs on e4m3 tensor cores with row-wise power-of-two scales.
# Their rate over the measured bf16 one is an assumption: FP8's dense peak is twice bf16's on an H100/H200; the
# scales' epilogue and FP8 kernels younger than bf16's keep a GEMM below that (optimistic 1.9x, pessimistic 1.5x).
FP8_GEMM_SPEEDUP = (1.9, 1.5)
FP8 = 1  # bytes an e4m3 element
# Beyond the bf16 op's launches: the zeroed int32 row maxima of dy (one small kernel) and the launch that quantises
# dy once the gradient launch has found them (reads dy again, writes its e4m3 copy). x's copy is written by the
# shrink in a second pass over its token block: from L2 (optimistic) or HBM (pessimistic). The cuBLAS-composed FP8
# forward also builds the operands of its rank-r addmm ([S, 1] and [s * B.T; bias]): four more small kernels.
FP8_SMALL_KERNELS = {"zeros": 1}
FP8_CUBLAS_SMALL_KERNELS = {"new_ones": 1, "cat": 2, "mul": 1}

# What one fwd+bwd launches (p > 0, bias, seed drawn on the device), per engine: the Triton kernels in order, the
# cuBLAS GEMMs, and the small ATen kernels (the seed's randint, 4 zeros for dA / dB / dbias / dS's partials, 3 casts
# of the fp32 gradients), the same on the eager path (what the benchmarks time and this model prices) and on the
# registered ops that torch.compile traces. `benchmarks/test_gpu_build.py` checks the kernels and
# TRACED_SMALL_KERNELS against a traced step, `benchmarks/test_time_model.py` EAGER_SMALL_KERNELS (and the FP8 ones)
# against the eager path's dispatched ops.
TRITON_KERNELS = {
    "triton": ("shrink_kernel", "fused_matmul_kernel", "grad_b_kernel", "grad_a_kernel", "fused_matmul_kernel"),
    "cublas": ("shrink_kernel", "grad_b_kernel", "grad_a_kernel"),
}
CUBLAS_GEMMS = {"triton": 0, "cublas": 2}
# ATen ops that launch the same small kernel under another name, as the counts above name it: a new_zeros is a zeros
# (the eager path allocates with x.new_zeros, which is cheaper on the host than torch.zeros).
SAME_KERNEL = {"new_zeros": "zeros"}
EAGER_SMALL_KERNELS = TRACED_SMALL_KERNELS = {"randint": 1, "zeros": 4, "_to_copy": 3}
MERGE_LAUNCHES = 2  # the merge reads A and B in every program, so their re-draw cannot join its launch
# Eager (PEFT-style) beyond the floor: 12 memory-bound launches at p > 0 (10 at p = 0) moving 1.41 GB at the
# headline (dropout, lora_A, lora_B, the scale, the add, their backward twins and dx's accumulation).
EAGER_LAUNCHES = {True: 12, False: 10}
EAGER_BYTES = 1.41e9
# Elsewhere they scale with the (M, K) and (M, N) tensors they move, about as many of each (counted per launch:
# ~11 passes over an (M, K) tensor, ~10 over an (M, N) one): EAGER_BYTES x (MK + MN) / (2 x 8192 x 4096).
EAGER_BYTES_SHAPE = (8192, 4096, 4096)


def eager_bytes(M: int, K: int, N: int) -> float:
    m0, k0, n0 = EAGER_BYTES_SHAPE
    return EAGER_BYTES * (M * K + M * N) / (m0 * k0 + m0 * n0)


@dataclass(frozen=True)
class Bounds:
    low: float  # the optimistic end
    high: float  # the pessimistic end

    def span(self, digits: int = 3) -> str:
        """"smaller-larger" (a speedup's optimistic end is the larger one), as PERF_NOTES writes a range."""
        return f"{min(self.low, self.high):.{digits}f}-{max(self.low, self.high):.{digits}f}"


def _both(price) -> Bounds:
    return Bounds(price(0), price(1))


def floor_s(M: int, K: int, N: int) -> Bounds:
    """`F.linear` forward + `dy @ W`: two cuBLAS GEMMs."""
    return _both(lambda b: 2 * (2 * M * N * K / CUBLAS_FLOPS[b] + LAUNCH_US * US))


def step_s(engine: str, M: int, K: int, N: int, r: int, dropout: bool) -> Bounds:
    """One fwd+bwd of the fused op on `engine` ("triton", "triton_tma" or "cublas"; "fp8_triton" or "fp8_cublas"
    with FP8 frozen weights) or of `eager`."""
    fp8 = engine.startswith("fp8_")
    engine = engine.removeprefix("fp8_")

    def price(b: int) -> float:
        hidden = b == 0  # optimistic: the mask hides under the bytes, addmm's read of its start under the GEMM
        mask = MASK_PASS_S if dropout else 0.0

        def memory(nbytes: float, masked: bool = False, bandwidth: float = COPY_BYTES_PER_S) -> float:
            t = nbytes / bandwidth
            if masked and mask:
                t = max(t, mask) if hidden else t + mask
            return t + LAUNCH_US * US

        rate = CUBLAS_FLOPS[b] * (FP8_GEMM_SPEEDUP[b] if fp8 else 1.0)
        gemm = 2 * M * N * K / rate + LAUNCH_US * US
        if engine == "eager":
            bandwidth = COPY_BYTES_PER_S * EAGER_BANDWIDTH_FRACTION[b]
            return 2 * gemm + eager_bytes(M, K, N) / bandwidth + EAGER_LAUNCHES[dropout] * LAUNCH_US * US + mask
        shrink = BF16 * (M * K + r * K + M * r)
        grad_b = BF16 * (M * N + M * r + N * r) + FP32 * (M * r + N * r)
        grad_a = BF16 * (M * K + M * r) + FP32 * (M * r + r * K)
        small = sum(EAGER_SMALL_KERNELS.values()) * SMALL_KERNEL_US * US
        quantise_dy = 0.0
        if fp8:
            shrink += FP8 * M * K + (0 if hidden else BF16 * M * K)
            quantise_dy = memory(BF16 * M * N + FP8 * M * N + FP32 * M)
            small += sum(FP8_SMALL_KERNELS.values()) * SMALL_KERNEL_US * US
            if engine == "cublas":
                small += sum(FP8_CUBLAS_SMALL_KERNELS.values()) * SMALL_KERNEL_US * US
        if engine == "cublas":
            start_read = 0.0 if hidden else BF16 * 2 * M * N / COPY_BYTES_PER_S  # addmm_ reads its start value
            expand = BF16 * (N * r + N + M * N)
            dx_start = BF16 * (r * K + M * K)
            return (memory(shrink + expand, masked=True) + gemm + start_read + memory(grad_b) + quantise_dy
                    + memory(grad_a + dx_start, masked=True) + gemm + start_read + small)
        fused_gemm = 2 * M * N * (K / (rate / CUBLAS_FLOPS[b]) + r) / (CUBLAS_FLOPS[b] * TRITON_GEMM_FRACTION[b])
        if engine == "triton_tma":
            fused_gemm /= TMA_GAIN
        dx_mask = 0.0 if hidden else mask  # the dx GEMM re-derives the mask: hidden or paid
        return (memory(shrink, masked=True) + fused_gemm + LAUNCH_US * US + memory(grad_b) + quantise_dy
                + memory(grad_a, masked=True) + fused_gemm + LAUNCH_US * US + dx_mask + small)

    return _both(price)


def headline_ratios(M: int = 8192, K: int = 4096, N: int = 4096, r: int = 16, dropout: bool = True) -> dict:
    """Each provider's predicted time over the floor, and each engine's speedup over eager (low, high)."""
    floor = floor_s(M, K, N)
    eager = step_s("eager", M, K, N, r, dropout)
    ratios = {"floor_ms": Bounds(floor.low * 1e3, floor.high * 1e3),
              "eager": Bounds(eager.low / floor.low, eager.high / floor.high)}
    for engine in ("triton", "triton_tma", "cublas"):
        t = step_s(engine, M, K, N, r, dropout)
        ratios[engine] = Bounds(t.low / floor.low, t.high / floor.high)
        ratios[f"{engine}_vs_eager"] = Bounds(eager.low / t.low, eager.high / t.high)
    return ratios


def fp8_ratios(M: int = 8192, K: int = 4096, N: int = 4096, r: int = 16, dropout: bool = True) -> dict:
    """Each FP8 engine's predicted speedup over eager bf16 and over this package's bf16 op (the engine the policy
    takes for the shape: cuBLAS-composed at K >= 1536, the Triton GEMM below), (optimistic, pessimistic)."""
    eager = step_s("eager", M, K, N, r, dropout)
    own = step_s("cublas" if K >= 1536 else "triton", M, K, N, r, dropout)
    ratios = {}
    for engine in ("fp8_triton", "fp8_cublas"):
        t = step_s(engine, M, K, N, r, dropout)
        ratios[f"{engine}_vs_eager"] = Bounds(eager.low / t.low, eager.high / t.high)
        ratios[f"{engine}_vs_bf16"] = Bounds(own.low / t.low, own.high / t.high)
        ratios[f"{engine}_ms"] = Bounds(t.low * 1e3, t.high * 1e3)
    return ratios


# Shapes of the FP8 predictions (tokens M, in K, out N): the headline, GPT-2 124M's MLP (8 x 1024 tokens) and
# Llama-3-8B's MLP up and down projections (8192 tokens).
FP8_SHAPES = {
    "headline 8192 x 4096 -> 4096": (8192, 4096, 4096),
    "GPT-2 124M MLP fc 8192 x 768 -> 3072": (8192, 768, 3072),
    "GPT-2 124M MLP proj 8192 x 3072 -> 768": (8192, 3072, 768),
    "Llama-8B MLP up 8192 x 4096 -> 14336": (8192, 4096, 14336),
    "Llama-8B MLP down 8192 x 14336 -> 4096": (8192, 14336, 4096),
}


def merge_copy_fraction(K: int = 4096, N: int = 4096, r: int = 16, launches: int = MERGE_LAUNCHES) -> Bounds:
    """merge + reinit's bytes at copy bandwidth over its time with `launches` fixed costs: the best fraction of
    copy bandwidth it can reach (the merge reads W, A, B and writes W; the reinit writes A and B)."""
    moved = BF16 * (2 * K * N + r * K + N * r) + BF16 * (r * K + N * r)
    transfer = moved / COPY_BYTES_PER_S
    return Bounds(*(transfer / (transfer + launches * fixed * US) for fixed in MERGE_LAUNCH_US))


def main() -> None:
    for dropout in (True, False):
        print(f"headline 8192 x 4096 -> 4096, r = 16, p = {0.1 if dropout else 0}, bf16, H200 (predicted):")
        for name, bounds in headline_ratios(dropout=dropout).items():
            print(f"  {name}: {bounds.span()}")
    print(f"merge + reinit 4096 x 4096, r = 16: {merge_copy_fraction().span()} of copy bandwidth "
          f"({MERGE_LAUNCHES} launches)")
    print("FP8 frozen weights, r = 16, p = 0.1, H200 (predicted): speedup over eager bf16 / over the bf16 op")
    for name, shape in FP8_SHAPES.items():
        ratios = fp8_ratios(*shape)
        print(f"  {name}: " + "; ".join(
            f"{engine} {ratios[f'{engine}_ms'].span(3)} ms, {ratios[f'{engine}_vs_eager'].span(2)}x / "
            f"{ratios[f'{engine}_vs_bf16'].span(2)}x" for engine in ("fp8_triton", "fp8_cublas")))


if __name__ == "__main__":
    main()
