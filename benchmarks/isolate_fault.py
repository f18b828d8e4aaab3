"""Which launch takes the CUDA context down: each case below in its own process (an illegal memory access poisons
the whole context, so every later call in that process fails too), with CUDA_LAUNCH_BLOCKING=1 so that the error
is raised by the launch that made it; then, where compute-sanitizer is installed, the first faulting case again
under its memcheck, which names the kernel, the source line and the address.

    python -m benchmarks.isolate_fault [--jobs 12] [--no-sanitizer]     # GPU: every case, one line each
    python -m benchmarks.isolate_fault --case NAME                       # one case in this process

A case: one launcher of the fused op (the shrink, the fused GEMM with a forced tile, the input gradient's GEMM,
the gradient launches) or the whole op forward and backward, at a shape given as M x K -> N, rank r, in fp16 with
random inputs; it prints `ok` with the GEMM's error against float64 where it has one (`WRONG` where that error
is over fp16's eps), or `FAULT` and the error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# (M, K, N, r): prime-ish token counts and widths that are no multiple of a block, against the multiples that ran.
SHAPES = {
    "odd": (2042, 1000, 1500, 1),  # tests/test_gpu.py's odd ranks and 3-D input, r = 1
    "odd_k64": (2042, 1024, 1500, 1),  # the same with K a multiple of 64
    "odd_mn": (2048, 1000, 1536, 16),  # only K off the blocks
    "tiny": (2048, 24, 40, 4),  # test_compile.lora_model's first layer
    "tile_test": (1000, 1024, 1500, 16),  # the every-tile test's shape
    "control": (4096, 768, 3072, 16),  # a shape whose tests passed
}


def _cases() -> dict[str, tuple[str, str, str | None]]:
    from relora_kernels.kernels import policy

    cases = {}
    for shape in ("odd", "tiny"):
        cases[f"shrink/{shape}"] = ("shrink", shape, None)
        cases[f"grad_ab/{shape}"] = ("grad_ab", shape, None)
    for shape in ("odd", "tiny", "control"):
        for engine in ("triton", "cublas"):
            cases[f"op_{engine}/{shape}"] = (f"op_{engine}", shape, None)
    for what, shapes in (("forward_gemm", ("odd", "tiny")), ("input_grad_gemm", ("odd",))):
        for shape in shapes:
            for tile in policy.GEMM_TILES:
                cases[f"{what}/{shape}/{tile.name}"] = (what, shape, tile.name)
    for shape in ("odd_k64", "odd_mn", "tile_test", "control"):
        tile = policy.GEMM_TILES[0]
        cases[f"forward_gemm/{shape}/{tile.name}"] = ("forward_gemm", shape, tile.name)
    return cases


def run_case(name: str, device: str = "cuda") -> str:
    """Run case `name` on `device` (a CPU runs it through the interpreter: the tool's own test) and say how it went."""
    import torch

    from relora_kernels.kernels import lora_linear, passes, policy

    what, shape, tile = _cases()[name]
    M, K, N, R = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    dev, dtype = device, torch.float16

    def rand(*size, std=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(dev, dtype)

    x, weight, lora_a, lora_b = rand(M, K), rand(N, K, std=K**-0.5), rand(R, K, std=K**-0.5), rand(N, R)
    seed = torch.tensor(7, device=dev)
    error = None
    if what == "shrink":
        lora_linear.lora_shrink(x, lora_a, 0.1, seed)
    elif what == "grad_ab":
        lora_linear.lora_grad_ab(rand(M, N), x, rand(M, R), lora_b, 2.0, 0.1, seed, True)
    elif what.startswith("op_"):
        import relora_kernels as rk

        rk.configure(backend="triton", engine=what[3:])
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        y = rk.lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, None, 0.1, 5)
        y.backward(torch.randn_like(y))
    else:
        low, up = rand(M, R), (lora_b.T if what == "forward_gemm" else lora_a)
        lhs, rhs = (x, weight.T) if what == "forward_gemm" else (rand(M, N), weight)
        with policy.forced_tile(policy.parse_tile(tile)):
            if what == "forward_gemm":
                out = passes.lora_forward_matmul(lhs, weight, low, lora_b, 2.0, None)
            else:
                out = passes.lora_input_grad(lhs, weight, low, lora_a, 0.0, None)
        exact = lhs.double() @ rhs.double() + (2.0 if what == "forward_gemm" else 1.0) * low.double() @ up.double()
        error = ((out.double() - exact).norm() / exact.norm()).item()
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
    if error is None:
        return "ok"
    # fp32 accumulation, then one rounding into fp16 (at most half an ulp): a right GEMM is under fp16's eps in norm
    return f"{'ok' if error < torch.finfo(dtype).eps else 'WRONG'}, relative error {error:.2e}"


def _run_in_process(name: str, sanitizer: str | None = None, timeout: int = 180) -> tuple[str, str]:
    command = [sys.executable, "-m", "benchmarks.isolate_fault", "--case", name]
    if sanitizer:
        command = [sanitizer, "--tool", "memcheck", "--print-limit", "4", *command]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return name, f"TIMEOUT after {timeout} s"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode == 0 and not sanitizer:
        return name, lines[-1] if lines else "ok"
    if sanitizer:
        keep = [line for line in lines if line.startswith("=========")][:40]
        return name, "\n".join(keep or lines[-20:])
    errors = [line for line in lines if "Error" in line or "error" in line]
    return name, "FAULT " + (errors[-1] if errors else lines[-1] if lines else f"exit code {done.returncode}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="run this case in this process")
    parser.add_argument("--jobs", type=int, default=12, help="cases run side by side (default 12)")
    parser.add_argument("--no-sanitizer", action="store_true", help="skip the memcheck run of the first fault")
    args = parser.parse_args(argv)
    if args.case:
        print(run_case(args.case))
        return 0
    names = list(_cases())
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(_run_in_process, names))
    for name in names:
        print(f"{name:48s} {results[name]}")
    wrong = [name for name in names if results[name].startswith("WRONG")]
    faults = [name for name in names if results[name].startswith(("FAULT", "TIMEOUT"))]
    print(f"{len(faults)} of {len(names)} cases faulted, {len(wrong)} computed wrong results")
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if faults and sanitizer and not args.no_sanitizer:
        cases = _cases()
        smallest = min(faults, key=lambda n: (SHAPES[cases[n][1]][0] * SHAPES[cases[n][1]][2], n))
        print(f"compute-sanitizer memcheck on {smallest}:")
        print(_run_in_process(smallest, sanitizer, timeout=240)[1])
    return 1 if faults or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
