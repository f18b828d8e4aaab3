"""Hugging Face PEFT adapters in and out: `save_peft_adapter` and `load_peft_adapter`.

PEFT's on-disk LoRA adapter is two files in a folder:
    adapter_config.json          {"peft_type": "LORA", "r": ..., "lora_alpha": ..., "target_modules": ..., ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in), ...lora_B.weight (out, r)
which is exactly LoRALinear's lora_A / lora_B layout, so the factors travel unchanged. An adapter holds only the
factors: PEFT must be given a base model whose weights equal this model's frozen weights (after ReLoRA restarts
have merged updates into them, save those weights too, e.g. `merge_lora` then the model's own save).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .distributed import full_tensor
from .modules import LoRALinear, _is_linear_like, _replace
from .utils import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight")


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_peft_adapter(model: nn.Module, path) -> None:
    """Write the LoRALinear layers of `model` as a PEFT LoRA adapter in the folder `path` (created if needed), so
    that `peft.PeftModel.from_pretrained(base_model, path)` computes what `model` computes.

    target_modules is written as a regex matching exactly these layers' names; layers whose rank or alpha differ
    from the most common one go into rank_pattern / alpha_pattern. PEFT has one lora_dropout per adapter: the
    most common layer dropout is written. All layers must agree on use_rslora.

    On an FSDP2-sharded model the factors are all-gathered (a collective: every rank must call it) and only the
    process of rank 0 writes the folder; the other ranks return without writing.
    """
    from safetensors.torch import save_file

    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layer to save (apply_lora or load_peft_adapter adds them)")
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("the LoRALinear layers mix use_rslora=True and False, which one PEFT adapter cannot hold")
    r = _most_common(layer.r for layer in layers.values())
    alpha = _most_common(layer.alpha for layer in layers.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(layer.dropout for layer in layers.values()),
        "use_rslora": rslora.pop(),
        # A regex in full over module names (a list would also match name suffixes: "0" would catch "2.0").
        "target_modules": "|".join(re.escape(name) for name in layers),
        "rank_pattern": {re.escape(name): layer.r for name, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(name): layer.alpha for name, layer in layers.items() if layer.alpha != alpha},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = full_tensor(layer.lora_A.detach()).cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = full_tensor(layer.lora_B.detach()).cpu().contiguous()
    if any(layer._is_sharded() for layer in layers.values()) and torch.distributed.get_rank() != 0:
        return

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def _read_config(folder: Path) -> dict:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {name} is missing")
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters load")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "layer_replication": bool(config.get("layer_replication")),
        "target_parameters": bool(config.get("target_parameters")),
        # Variants whose layers compute something else than x W^T + scale * x A^T B^T: activated LoRA (the adapter
        # acts only after its invocation tokens), QA-LoRA (pooled inputs), Arrow (routing among adapters),
        # block-diagonal, Monte Carlo and KaSA LoRA.
        "alora_invocation_tokens": bool(config.get("alora_invocation_tokens")),
        "use_qalora": bool(config.get("use_qalora")),
        "arrow_config": bool(config.get("arrow_config")),
        "use_bdlora": bool(config.get("use_bdlora")),
        "monteclora_config": bool(config.get("monteclora_config")),
        "kasa_config": bool(config.get("kasa_config")),
    }
    for key, used in unsupported.items():
        if used:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by LoRALinear")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{path}: {key} must be an object of module name patterns, got {config[key]!r}")
    # Patterns are regular expressions (target_modules when a string): one that does not compile is named here,
    # not met as a traceback while the layers are matched.
    patterns = [("target_modules", config["target_modules"])] if isinstance(config.get("target_modules"), str) else []
    patterns += [(key, name) for key in ("rank_pattern", "alpha_pattern") for name in config.get(key) or {}]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{path}: {key} pattern {pattern!r} is not a regular expression ({e})") from None
    return config


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank/alpha_pattern rule: a key matches a module whose name ends with it at a dot boundary."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _layer_settings(config: dict, name: str, path: Path) -> tuple[float, float, bool]:
    """(alpha, dropout, use_rslora) of module `name` under the adapter config, checked as LoRALinear would."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    dropout = config.get("lora_dropout", 0.0)
    rslora = config.get("use_rslora", False)
    for key, value, ok in (("lora_alpha", alpha, _is_real(alpha) and math.isfinite(alpha)),
                           ("lora_dropout", dropout, _is_real(dropout) and 0.0 <= dropout < 1.0),
                           ("use_rslora", rslora, isinstance(rslora, bool))):
        if not ok:
            raise ValueError(f"{path}: {key}={value!r} for {name} is not valid")
    return alpha, float(dropout), rslora


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_factors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA factor of a linear layer")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} is a {tensor.dim()}-d {str(tensor.dtype).removeprefix('torch.')} "
                             "tensor; a LoRA factor is a 2-d real floating-point matrix")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise ValueError(f"{path} holds no LoRA factors")
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: module {name!r} lacks one of lora_A / lora_B")
    return factors


def _target_layer(model: nn.Module, name: str, r: int, settings) -> LoRALinear:
    """The LoRALinear that will hold `name`'s factors: the module itself if it is one (checked, not yet changed),
    else a new one made from the nn.Linear / Conv1D (not yet put into the model)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the adapter adapts {name!r}, which model has no module of that name") from None
    if isinstance(module, LoRALinear):
        if module.r != r:
            raise ValueError(f"{name} is a LoRALinear of r = {module.r}; the adapter's factors have r = {r}")
        return module
    if _is_linear_like(module):
        return LoRALinear.from_linear(module, r, *settings)
    raise ValueError(f"the adapter adapts {name!r}, a {type(module).__name__}; only nn.Linear / Conv1D load")


def load_peft_adapter(model: nn.Module, path) -> nn.Module:
    """Put the PEFT LoRA adapter saved in the folder `path` into `model`, in place; returns `model`.

    Each adapted module of `model` becomes a LoRALinear (as apply_lora would make it, weight frozen) holding the
    adapter's factors in the module's dtype and device; a module that is already a LoRALinear of the same rank
    has its factors overwritten and takes the adapter's alpha, dropout and use_rslora. rank, alpha (incl.
    rank_pattern / alpha_pattern), dropout and use_rslora follow the adapter's config. Everything is read and
    checked before the model is changed, so a failed load leaves it as it was. Raises FileNotFoundError for a
    missing file and ValueError, naming the file, for a malformed one or what LoRALinear cannot represent (DoRA,
    trained biases, ...).
    """
    folder = Path(path)
    config = _read_config(folder)
    plan = []
    for name, pair in _read_factors(folder).items():
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        settings = _layer_settings(config, name, folder / CONFIG_NAME)
        layer = _target_layer(model, name, lora_a.shape[0], settings)
        if lora_a.shape != layer.lora_A.shape or lora_b.shape != layer.lora_B.shape:
            raise ValueError(f"{name}: adapter factors {tuple(lora_a.shape)} and {tuple(lora_b.shape)} do not fit "
                             f"the layer's {tuple(layer.lora_A.shape)} and {tuple(layer.lora_B.shape)}")
        plan.append((name, layer, settings, lora_a, lora_b))
    for name, layer, settings, lora_a, lora_b in plan:  # nothing below can fail: the model changes only here
        if layer is model.get_submodule(name):
            layer.set_scaling(*settings)
        else:
            _replace(model, name, layer)
        with torch.no_grad():
            layer.lora_A.copy_(lora_a)
            layer.lora_B.copy_(lora_b)
    return model
