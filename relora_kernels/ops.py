"""The Triton launchers registered as torch.library ops (docs/DESIGN.md sections 4 and 8).

    relora_kernels::lora_forward          (y, S): y = x @ W.T + bias + s * dropout_p(x) @ A.T @ B.T
    relora_kernels::lora_backward         (dx, dA, dB, dbias)
    relora_kernels::lora_forward_fp8      lora_forward with the frozen GEMM on W's FP8 copy (kernels/passes_fp8.py)
    relora_kernels::lora_backward_fp8     lora_backward with dy @ W on the FP8 copy of W.T
    relora_kernels::merge_lora_weight_    W <- W + s * B @ A            (mutates weight)
    relora_kernels::reinit_lora_          A <- U(...), B <- 0           (mutates lora_a, lora_b)

Each pass runs on the engine kernels/policy.py chooses for it (the fused Triton GEMM, or Triton launches composed
with cuBLAS's addmm). Each is a `triton_op`: torch.compile traces into it and sees the kernels themselves (launched
through `wrap_triton`) and any addmm beside them, so a model of LoRALinear layers compiles into one graph; running
the launcher on fake tensors is its fake (meta) implementation, which is why the launchers do nothing
data-dependent on the host. Under the Triton interpreter (CPU tests) they are opaque custom ops with explicit fake
implementations instead: the same calls, still captured whole by torch.compile, but not fused into by Inductor.
The autograd wrapper in functional.py calls these names; nothing else does.
"""

from __future__ import annotations

import torch

from .kernels import merge as _merge_kernels
from .kernels import passes as _passes
from .kernels import passes_fp8 as _passes_fp8
from .kernels.launch import TRACEABLE_LAUNCHES

_NAMESPACE = "relora_kernels"


# Shapes and dtypes of each op's outputs, for tracing. A triton_op needs none (its launcher, run on fake tensors,
# is its fake implementation), but the interpreter's kernels cannot be traced, so there the ops are opaque
# custom ops and these are their fake implementations.
def _fake_lora_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _fake_lora_backward(grad_y, x, weight, lora_a, lora_b, shrunk, scale, dropout_p, seed, need_input_grad,
                        need_bias_grad, deterministic=False):
    return (x.new_empty((x.shape[0] if need_input_grad else 0, x.shape[1])), x.new_empty(lora_a.shape),
            x.new_empty(lora_b.shape), x.new_empty((grad_y.shape[1] if need_bias_grad else 0,)))


def _fake_lora_forward_fp8(x, weight_q, weight_scale, lora_a, lora_b, scale, bias, dropout_p, seed):
    return x.new_empty((x.shape[0], weight_q.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _fake_lora_backward_fp8(grad_y, x, weight_t_q, weight_t_scale, lora_a, lora_b, shrunk, scale, dropout_p, seed,
                            need_input_grad, need_bias_grad, deterministic=False):
    return (x.new_empty((x.shape[0] if need_input_grad else 0, x.shape[1])), x.new_empty(lora_a.shape),
            x.new_empty(lora_b.shape), x.new_empty((grad_y.shape[1] if need_bias_grad else 0,)))


def _fake_in_place(*args):
    return None


# name: (launcher, the arguments it writes in place, fake implementation)
_LAUNCHERS = {
    "lora_forward": (_passes.lora_forward, (), _fake_lora_forward),
    "lora_backward": (_passes.lora_backward, (), _fake_lora_backward),
    "lora_forward_fp8": (_passes_fp8.lora_forward_fp8, (), _fake_lora_forward_fp8),
    "lora_backward_fp8": (_passes_fp8.lora_backward_fp8, (), _fake_lora_backward_fp8),
    "merge_lora_weight_": (_merge_kernels.merge_lora_weight_, ("weight",), _fake_in_place),
    "reinit_lora_": (_merge_kernels.reinit_lora_, ("lora_a", "lora_b"), _fake_in_place),
}

# How the ops are registered: "triton_op" (Inductor traces into the kernels), or "custom_op" under
# TRITON_INTERPRET=1, whose interpreted kernels torch cannot trace: opaque to Inductor, still one graph under
# torch.compile.
REGISTRATION = "triton_op" if TRACEABLE_LAUNCHES else "custom_op"


def _register(name: str):
    launcher, mutates, fake = _LAUNCHERS[name]
    if REGISTRATION == "triton_op":
        return torch.library.triton_op(f"{_NAMESPACE}::{name}", launcher, mutates_args=mutates)
    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", launcher, mutates_args=mutates)
    op.register_fake(fake)
    return op


lora_forward = _register("lora_forward")
lora_backward = _register("lora_backward")
lora_forward_fp8 = _register("lora_forward_fp8")
lora_backward_fp8 = _register("lora_backward_fp8")
merge_lora_weight_ = _register("merge_lora_weight_")
reinit_lora_ = _register("reinit_lora_")
