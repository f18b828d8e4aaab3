"""Trace every registered op's launcher with symbolic shapes, as torch.compile(dynamic=True) and opcheck's
test_aot_dispatch_dynamic do on a GPU, where the ops are triton_ops whose launchers run on fake tensors.

Run as a script, without the interpreter (so that ops.py registers triton_ops), by test_compile.py: the kernels never
launch (fake tensors), so no GPU is needed; the policy answers as on an H100. Prints one line per case and exits 1
if any case fails."""

import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import relora_kernels as rk  # noqa: E402
from relora_kernels import ops  # noqa: E402
from relora_kernels.kernels import policy  # noqa: E402

H100_SHARED_MEMORY, H100_MULTIPROCESSORS = 232448, 132


def main() -> int:
    import test_compile
    import test_fp8_op

    assert ops.REGISTRATION == "triton_op", ops.REGISTRATION
    policy.interpreting = lambda: False
    policy.current_arch = lambda: 90
    policy.shared_memory_limit = lambda: H100_SHARED_MEMORY
    policy.multiprocessor_count = lambda *_: H100_MULTIPROCESSORS
    cases = [(f"{engine}: {case}", engine, name, args) for engine in ("triton", "cublas")
             for case, (name, args) in test_compile.op_cases().items()]
    cases += [(f"fp8 {case}", engine, name, args) for case, (name, args, engine) in test_fp8_op.op_cases().items()]
    failures = 0
    for label, engine, name, args in cases:
        rk.configure(engine=engine)
        op = getattr(torch.ops.relora_kernels, name).default
        try:
            graph = make_fx(lambda *a, op=op: op(*a), tracing_mode="symbolic")(*args)
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            print(f"FAILED {label}\n{traceback.format_exc(limit=-4)}")
            continue
        calls = sum(node.target is op for node in graph.graph.nodes)
        symbolic = any(isinstance(s, torch.SymInt) for p in graph.graph.find_nodes(op="placeholder")
                       if isinstance(p.meta.get("val"), torch.Tensor) for s in p.meta["val"].shape)
        ok = calls == 1 and symbolic
        failures += not ok
        print(f"{'ok' if ok else 'FAILED'} {label}: {calls} call(s) of the op, symbolic inputs: {symbolic}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
