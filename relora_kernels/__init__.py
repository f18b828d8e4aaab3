"""relora_kernels: Triton kernels for LoRA layers fast enough to pre-train with ReLoRA.

    import relora_kernels as rk
    y = rk.lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=None)
    rk.merge_and_reinit_(weight, lora_a, lora_b, scale, seed=0)
    layer = rk.LoRALinear(in_features, out_features, r)          # or rk.apply_lora(model, ["c_attn"], r=16)
    rk.save_peft_adapter(model, "adapter/"); rk.load_peft_adapter(base_model, "adapter/")   # PEFT's format
    from relora_kernels.relora import ReLoRA, jagged_cosine, prune_optimizer_state_
"""

from .adapters import load_peft_adapter, save_peft_adapter
from .functional import lora_linear, merge_and_reinit_
from .modules import LoRALinear, apply_lora, merge_lora

__all__ = ["lora_linear", "merge_and_reinit_", "LoRALinear", "apply_lora", "merge_lora", "save_peft_adapter",
           "load_peft_adapter"]
__version__ = "0.1.0"
