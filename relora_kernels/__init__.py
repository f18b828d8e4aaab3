"""relora_kernels: Triton kernels for LoRA layers fast enough to pre-train with ReLoRA.

    import relora_kernels as rk
    y = rk.lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout_p=0.0, seed=None)
    y = rk.lora_linear_fp8(x, rk.quantize_fp8_weight(weight), lora_a, lora_b, ...)   # frozen GEMMs in FP8 (e4m3)
    rk.merge_and_reinit_(weight, lora_a, lora_b, scale, seed=0)
    layer = rk.LoRALinear(in_features, out_features, r)          # or rk.apply_lora(model, ["c_attn"], r=16)
    rk.save_peft_adapter(model, "adapter/"); rk.load_peft_adapter(base_model, "adapter/")   # PEFT's format
    controller = rk.ReLoRA(model, optimizer, restart_every=..., ...)      # + rk.jagged_cosine for the schedule
    with rk.settings(engine="cublas", deterministic=True): ...           # switches (RELORA_KERNELS_* seed them)
"""

from ._settings import Settings, configure, settings
from ._settings import current as current_settings
from .adapters import load_peft_adapter, save_peft_adapter
from .functional import lora_linear, lora_linear_fp8, merge_and_reinit_, quantize_fp8_weight
from .modules import LoRALinear, apply_lora, ddp_skip_fp8_copies, fsdp_shard_fp8_weights, merge_lora
from .reference import FP8Weight
from .relora import ReLoRA, jagged_cosine

__all__ = ["lora_linear", "lora_linear_fp8", "quantize_fp8_weight", "FP8Weight", "merge_and_reinit_",
           "LoRALinear", "apply_lora", "merge_lora", "ddp_skip_fp8_copies", "fsdp_shard_fp8_weights",
           "save_peft_adapter",
           "load_peft_adapter", "ReLoRA", "jagged_cosine", "settings", "configure", "current_settings", "Settings"]
__version__ = "0.1.0"
