"""PEFT adapter interop, checked against PEFT itself: ours -> PEFT, PEFT -> ours, ours -> ours, and bad input."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn as nn
import transformers
from helpers import assert_within_torch_error
from safetensors.torch import load_file, save_file

import relora_kernels as rk

IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_same_function(got: nn.Module, twin: nn.Module):
    """got's logits against a float64 copy of it, within twice the fp32 error of `twin` (another fp32 computation
    of the same function) plus the per-dtype slack: the project's dtype-derived bound, whatever the CPU."""
    exact = logits(copy.deepcopy(got).double())
    assert_within_torch_error("logits", logits(got), exact, logits(twin))


def randomize_lora_b(model: nn.Module, seed: int = 2) -> None:
    """B starts at zero, which would make any adapter look right: give every B nonzero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_lora_layers(peft_model) -> dict[str, tuple[int, float]]:
    """{module name in the base model: (r, scaling)} of PEFT's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): (m.r["default"], m.scaling["default"])
            for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    base = tiny_gpt2()
    ours = rk.apply_lora(copy.deepcopy(base), ["c_attn", "c_fc"], r=4, alpha=8, dropout=0.1)
    # One layer with its own rank and alpha, written to rank_pattern / alpha_pattern.
    name = "transformer.h.1.mlp.c_fc"
    odd = rk.LoRALinear.from_linear(base.get_submodule(name), r=2, alpha=5, dropout=0.1)
    ours.transformer.h[1].mlp.c_fc = odd
    randomize_lora_b(ours)
    ours.eval()
    assert not torch.allclose(logits(ours), logits(base)), "the adapter must change the function"

    rk.save_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert_same_function(loaded, ours)
    expected = {n: (m.r, m.scale) for n, m in ours.named_modules() if isinstance(m, rk.LoRALinear)}
    assert peft_lora_layers(loaded) == expected  # exactly our layers, with our ranks and scales


def test_peft_adapter_loads_into_lora_linear_layers(tmp_path):
    base = tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.05,
                             use_rslora=True, rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3})
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()

    ours = rk.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()

    assert_same_function(ours, peft_model)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, rk.LoRALinear)}
    assert {n: (m.r, m.scale) for n, m in layers.items()} == peft_lora_layers(peft_model)
    assert all(m.dropout == 0.05 and m.use_rslora and not m.weight.requires_grad for m in layers.values())


def test_round_trip_through_our_own_format_on_the_kernel_path(tmp_path, monkeypatch):
    rk.configure(backend="triton")  # the kernels through the interpreter
    base = tiny_gpt2()
    ours = rk.apply_lora(copy.deepcopy(base), r"transformer\.h\.\d+\.attn\.c_attn", r=3, alpha=6)
    randomize_lora_b(ours)
    rk.save_peft_adapter(ours, tmp_path / "adapter")
    again = rk.load_peft_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=0)
    # Loading into layers that already are LoRALinear overwrites their factors.
    fresh = rk.apply_lora(copy.deepcopy(base), r"transformer\.h\.\d+\.attn\.c_attn", r=3, alpha=6)
    torch.testing.assert_close(logits(rk.load_peft_adapter(fresh, tmp_path / "adapter")), logits(ours),
                               rtol=0, atol=0)


def test_save_leaves_no_partial_files_on_failure(tmp_path, monkeypatch):
    ours = rk.apply_lora(tiny_gpt2(), ["c_attn"], r=2)
    rk.save_peft_adapter(ours, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    randomize_lora_b(ours)
    with pytest.raises(OSError, match="disk full"):
        rk.save_peft_adapter(ours, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the old adapter, whole; no temp files


def write_adapter(folder, config_changes=None, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]} | (config_changes or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
                   "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)}
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("config_changes, tensors, error, match", [
    ({"peft_type": "IA3"}, None, ValueError, "only LORA adapters"),
    ({"use_dora": True}, None, ValueError, "use_dora=True is not supported"),
    ({"bias": "all"}, None, ValueError, "bias='all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, None, ValueError, "modules_to_save"),
    (None, {"base_model.model.transformer.wte.lora_embedding_A": torch.zeros(2, 97)}, ValueError,
     "not a LoRA factor of a linear layer"),
    (None, {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32)}, ValueError,
     "lacks one of lora_A / lora_B"),
    (None, {"base_model.model.nope.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.nope.lora_B.weight": torch.zeros(96, 2)}, ValueError, "no module of that name"),
    (None, {"base_model.model.transformer.ln_f.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.transformer.ln_f.lora_B.weight": torch.zeros(32, 2)}, ValueError,
     "a LayerNorm; only nn.Linear / Conv1D load"),
    (None, {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 31),
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)}, ValueError,
     "do not fit"),
])
def test_load_rejects_what_lora_linear_cannot_hold(tmp_path, config_changes, tensors, error, match):
    folder = write_adapter(tmp_path / "a", config_changes, tensors)
    with pytest.raises(error, match=match):
        rk.load_peft_adapter(tiny_gpt2(), folder)


def test_load_and_save_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        rk.load_peft_adapter(tiny_gpt2(), tmp_path)
    with pytest.raises(ValueError, match="no LoRALinear layer to save"):
        rk.save_peft_adapter(tiny_gpt2(), tmp_path)
    model = rk.apply_lora(tiny_gpt2(), ["c_attn"], r=2)
    rk.save_peft_adapter(model, tmp_path / "r2")
    with pytest.raises(ValueError, match="LoRALinear of r = 4; the adapter's factors have r = 2"):
        rk.load_peft_adapter(rk.apply_lora(tiny_gpt2(), ["c_attn"], r=4), tmp_path / "r2")


def test_saved_files_are_peft_layout(tmp_path):
    model = rk.apply_lora(tiny_gpt2(), ["c_attn"], r=2)
    rk.save_peft_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{f}.weight" for i in (0, 1) for f in "AB"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["fan_in_fan_out"] is True  # GPT-2 Conv1D


def test_merged_hf_gpt2_keeps_conv1d_and_round_trips_through_save_pretrained(tmp_path):
    from transformers.pytorch_utils import Conv1D

    base = tiny_gpt2()
    ours = rk.apply_lora(copy.deepcopy(base), ["c_attn", "c_proj", "c_fc"], r=4, alpha=8)
    randomize_lora_b(ours)
    want = logits(ours)
    state = torch.get_rng_state()
    merged = rk.merge_lora(ours)
    assert torch.equal(torch.get_rng_state(), state)  # building the Conv1D layers drew nothing
    names = [n for n, m in base.named_modules() if isinstance(m, Conv1D)]
    assert len(names) == 8 and all(type(merged.get_submodule(n)) is Conv1D for n in names)
    # nn.Linear here made from_pretrained fail on c_attn / c_fc and load the square c_proj transposed.
    torch.testing.assert_close(logits(merged), want)
    merged.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again), logits(merged))


def test_load_into_lora_layers_takes_the_adapters_scale_dropout_and_rslora(tmp_path):
    base = tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"], lora_dropout=0.1, use_rslora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = rk.apply_lora(copy.deepcopy(base), ["c_attn"], r=4)  # alpha = r: scale 1, no dropout, no rsLoRA
    layers = [m for m in ours.modules() if isinstance(m, rk.LoRALinear)]
    rk.load_peft_adapter(ours, tmp_path)
    assert all((m.scale, m.dropout, m.use_rslora) == (32 / 2, 0.1, True) for m in layers)  # alpha / sqrt(r)
    assert all(m is ours.get_submodule(n) for m, n in zip(layers, peft_lora_layers(peft_model), strict=True))
    torch.testing.assert_close(logits(ours.eval()), logits(peft_model.eval()))


@pytest.mark.parametrize("config_text, match", [
    ("{not json", "adapter_config.json: not valid JSON"),
    ('["LORA"]', "adapter_config.json: expected a JSON object, got list"),
    ('{"peft_type": "LORA", "lora_alpha": "big"}', "adapter_config.json: lora_alpha='big' for transformer.h.0"),
    ('{"peft_type": "LORA", "lora_dropout": 1.5}', "adapter_config.json: lora_dropout=1.5"),
    ('{"peft_type": "LORA", "alpha_pattern": ["c_attn"]}', "alpha_pattern must be an object"),
])
def test_malformed_config_is_named_and_leaves_the_model_untouched(tmp_path, config_text, match):
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text(config_text)
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        rk.load_peft_adapter(model, folder)
    assert not any(isinstance(m, rk.LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_load_failing_half_way_changes_nothing(tmp_path):
    # The first module's factors fit; the second's do not. The first used to be converted before the error.
    good = {f"base_model.model.transformer.h.0.attn.c_attn.lora_{f}.weight": torch.ones(s) for f, s in
            (("A", (2, 32)), ("B", (96, 2)))}
    bad = {"base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": torch.ones(2, 31),
           "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight": torch.ones(96, 2)}
    folder = write_adapter(tmp_path / "a", tensors=good | bad)
    model = rk.apply_lora(tiny_gpt2(), ["transformer.h.0.attn.c_attn"], r=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="do not fit"):
        rk.load_peft_adapter(model, folder)
    assert type(model.transformer.h[1].attn.c_attn).__name__ == "Conv1D"
    assert model.transformer.h[0].attn.c_attn.scale == 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        rk.load_peft_adapter(model, folder)


A_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


@pytest.mark.parametrize("config_changes, tensors, match", [
    # An activated LoRA acts only on the tokens after its invocation sequence: loaded as a plain LoRA it changed
    # every position's output.
    ({"alora_invocation_tokens": [50, 51]}, None, r"adapter_config.json: alora_invocation_tokens=\[50, 51\] is not "
                                                  "supported by LoRALinear"),
    ({"use_qalora": True}, None, "adapter_config.json: use_qalora=True is not supported"),
    ({"target_modules": "transformer.(h"}, None, r"adapter_config.json: target_modules pattern 'transformer.\(h' "
                                                 "is not a regular expression"),
    ({"rank_pattern": {"c_attn[": 4}}, None, r"adapter_config.json: rank_pattern pattern 'c_attn\[' is not a "
                                              "regular expression"),
    (None, {A_KEY: torch.tensor(1.0), B_KEY: torch.zeros(96, 2)},
     f"adapter_model.safetensors: tensor '{A_KEY}' is a 0-d float32 tensor; a LoRA factor is a 2-d real"),
    (None, {A_KEY: torch.zeros(2, 32, dtype=torch.complex64), B_KEY: torch.zeros(96, 2)},
     f"adapter_model.safetensors: tensor '{A_KEY}' is a 2-d complex64 tensor"),
    (None, {A_KEY: torch.zeros(2, 32, dtype=torch.int32), B_KEY: torch.zeros(96, 2)}, "is a 2-d int32 tensor"),
])
def test_unsupported_variants_and_malformed_patterns_or_factors_are_one_line_errors(tmp_path, config_changes,
                                                                                     tensors, match):
    folder = write_adapter(tmp_path / "a", config_changes, tensors)
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match) as raised:
        rk.load_peft_adapter(model, folder)
    assert str(folder) in str(raised.value) and len(str(raised.value).splitlines()) == 1
    assert not any(isinstance(m, rk.LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
