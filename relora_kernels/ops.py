"""The Triton launchers registered as torch.library ops (DESIGN.md section 4, layer 3).

    relora_kernels::lora_shrink           S = dropout_p(x) @ A.T
    relora_kernels::lora_forward_matmul   y = x @ W.T + bias + s * S @ B.T
    relora_kernels::lora_grad_ab          (dA, dB, dS, dbias)
    relora_kernels::lora_input_grad       dx = dy @ W + mask(dS @ A) / (1-p)
    relora_kernels::merge_lora_weight_    W <- W + s * B @ A            (mutates weight)
    relora_kernels::reinit_lora_          A <- U(...), B <- 0           (mutates lora_a, lora_b)

Each is a `triton_op`: torch.compile traces into it and sees the kernels themselves (launched through
`wrap_triton`), so a model of LoRALinear layers compiles into one graph; running the launcher on fake tensors is
its fake (meta) implementation, which is why the launchers do nothing data-dependent on the host. Where torch has
no `triton_op` (before 2.6) the names below are the plain launchers: the same calls, without graph capture.
The autograd wrappers in functional.py call these names; nothing else does.
"""

from __future__ import annotations

import torch

from .kernels import lora_linear as _lora_kernels
from .kernels import merge as _merge_kernels

_NAMESPACE = "relora_kernels"

# (launcher, the arguments it writes in place)
_LAUNCHERS = {
    "lora_shrink": (_lora_kernels.lora_shrink, ()),
    "lora_forward_matmul": (_lora_kernels.lora_forward_matmul, ()),
    "lora_grad_ab": (_lora_kernels.lora_grad_ab, ()),
    "lora_input_grad": (_lora_kernels.lora_input_grad, ()),
    "merge_lora_weight_": (_merge_kernels.merge_lora_weight_, ("weight",)),
    "reinit_lora_": (_merge_kernels.reinit_lora_, ("lora_a", "lora_b")),
}

REGISTERED = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _register(name: str):
    launcher, mutates = _LAUNCHERS[name]
    if not REGISTERED:
        return launcher
    return torch.library.triton_op(f"{_NAMESPACE}::{name}", launcher, mutates_args=mutates)


lora_shrink = _register("lora_shrink")
lora_forward_matmul = _register("lora_forward_matmul")
lora_grad_ab = _register("lora_grad_ab")
lora_input_grad = _register("lora_input_grad")
merge_lora_weight_ = _register("merge_lora_weight_")
reinit_lora_ = _register("reinit_lora_")
