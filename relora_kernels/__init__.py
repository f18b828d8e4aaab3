"""relora_kernels: Triton kernels for LoRA layers fast enough to pre-train with ReLoRA.

    import relora_kernels as rk
    y = rk.lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=None)
"""

from .functional import lora_linear

__all__ = ["lora_linear"]
__version__ = "0.1.0"
