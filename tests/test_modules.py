"""LoRALinear, apply_lora and merge_lora: initialisation, wrapping nn.Linear / GPT-2 Conv1D, matching rules, PEFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_within_bound, assert_within_torch_error, linear_magnitude, rounding_bound

import relora_kernels as rk


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.attn["q_proj"](x) + self.attn["v_proj"](x)
        return self.norm(x + self.mlp(h))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block())


def test_layer_init_scale_and_freezing():
    torch.manual_seed(0)
    layer = rk.LoRALinear(40, 30, r=8, alpha=16, dropout=0.1)
    assert layer.scale == 2.0
    assert rk.LoRALinear(40, 30, r=16, alpha=8, use_rslora=True).scale == 2.0  # alpha / sqrt(r)
    assert rk.LoRALinear(40, 30, r=4).scale == 1.0  # alpha defaults to r
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.equal(layer.lora_B, torch.zeros(30, 8))
    # kaiming_uniform_(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT use.
    bound = 1 / math.sqrt(40)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert "r=8" in repr(layer) and "scale=2" in repr(layer) and "dropout=0.1" in repr(layer)


@pytest.mark.parametrize("kwargs, text", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"r": 2.5}, "r must be an integer >= 1"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"alpha": float("inf")}, "alpha must be a finite number"),
])
def test_layer_bad_arguments(kwargs, text):
    with pytest.raises(ValueError) as info:
        rk.LoRALinear(**{"in_features": 8, "out_features": 4, "r": 2, **kwargs})
    assert text in str(info.value)


def test_from_linear_keeps_the_function_and_shares_the_weight():
    linear = nn.Linear(20, 12)
    layer = rk.LoRALinear.from_linear(linear, r=4, alpha=8)
    x = torch.randn(5, 20)
    assert torch.equal(layer(x), linear(x))
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        rk.LoRALinear.from_linear(nn.Conv1d(3, 4, 1), r=2)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = rk.LoRALinear(16, 8, r=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask per call (seed drawn from torch's generator)


def test_merge_and_reinit_and_to_linear_keep_the_function():
    torch.manual_seed(0)
    layer = rk.LoRALinear(16, 8, r=4, alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 16)
    expected = layer(x)
    # Two fp32 computations of one function, each within its rounding bound (K + r + 2 terms, the merge included).
    bound = 2 * rounding_bound(torch.float32, 16 + 4 + 2, linear_magnitude(x, layer.weight, layer.lora_A,
                                                                          layer.lora_B, layer.scale, layer.bias))
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear)
    assert_within_bound("to_linear", linear(x), expected, bound)
    layer.merge_and_reinit(seed=0)
    assert not layer.lora_B.any()
    assert_within_bound("merged", layer(x), expected, bound)


def test_apply_lora_list_matches_exact_names_and_suffixes():
    model = tiny_model()
    untouched = model[0].mlp[0]
    rk.apply_lora(model, ["q_proj", "1.mlp.0"], r=4)
    assert isinstance(model[0].attn["q_proj"], rk.LoRALinear)
    assert isinstance(model[1].attn["q_proj"], rk.LoRALinear)
    assert isinstance(model[1].mlp[0], rk.LoRALinear)
    assert model[0].mlp[0] is untouched  # "1.mlp.0" is a suffix of "1.mlp.0" only
    assert isinstance(model[0].attn["v_proj"], nn.Linear)
    # "proj" is not a suffix at a dot of "q_proj": PEFT's rule, not a substring match.
    with pytest.raises(ValueError, match="matched no nn.Linear/Conv1D module"):
        rk.apply_lora(tiny_model(), ["proj"], r=4)


def test_apply_lora_regex_is_matched_in_full():
    model = rk.apply_lora(tiny_model(), r".*\.attn\.(q|v)_proj", r=2)
    assert sum(isinstance(m, rk.LoRALinear) for m in model.modules()) == 4
    with pytest.raises(ValueError, match=r"the model's linear modules are: 0\.attn\.q_proj"):
        rk.apply_lora(tiny_model(), r"attn", r=2)  # a partial match is no match


def test_apply_lora_freezes_only_matched_base_weights_and_keeps_the_function():
    model = tiny_model()
    x = torch.randn(3, 5, 24)
    expected = model(x)
    rk.apply_lora(model, ["q_proj", "v_proj"], r=4)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{i}.attn.{proj}.weight" for i in range(2) for proj in ("q_proj", "v_proj")}


def test_merge_lora_exports_plain_linears():
    model = rk.apply_lora(tiny_model(), ["q_proj", "v_proj", "0", "2"], r=4)
    for module in model.modules():
        if isinstance(module, rk.LoRALinear):
            nn.init.normal_(module.lora_B, std=0.1)
    x = torch.randn(4, 24)
    expected = model(x)
    exact = copy.deepcopy(model).double()(x.double())
    rk.merge_lora(model)
    assert not any(isinstance(m, rk.LoRALinear) for m in model.modules())
    # Within twice the unmerged fp32 model's error against float64 (the project's dtype-derived bound).
    assert_within_torch_error("merged model", model(x), exact, expected)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: GPT-2's Conv1D and PEFT's LoRA layer
# ---------------------------------------------------------------------------------------------------------------


def tiny_gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_apply_lora_keeps_the_loss_and_trains(monkeypatch):
    # The kernels through the interpreter (fp32), so the Conv1D wrapping is checked on the path a GPU would take.
    rk.configure(backend="triton")
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_before = model(ids, labels=ids).loss.detach()
    exact = copy.deepcopy(model).double()(ids, labels=ids).loss.detach()
    rk.apply_lora(model, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8)
    assert sum(isinstance(m, rk.LoRALinear) for m in model.modules()) == 8
    # B = 0: the same function; against float64, within twice the Conv1D model's own fp32 error.
    assert_within_torch_error("loss", model(ids, labels=ids).loss.detach(), exact, loss_before)
    loss_before = loss_before.item()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert model(ids, labels=ids).loss.item() < loss_before - 0.05


def test_matches_peft_lora_layer(monkeypatch):
    # PEFT's Linear LoRA layer given the same factors: same output, same gradients for x, A, B and bias.
    import peft
    rk.configure(backend="triton")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 36))
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=6, lora_alpha=12, target_modules=["0"], lora_dropout=0.0, bias="lora_only")
    )
    peft_layer = peft_model.base_model.model[0]
    nn.init.normal_(peft_layer.lora_B["default"].weight)

    ours = rk.LoRALinear(40, 36, r=6, alpha=12)
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scale == peft_layer.scaling["default"]

    # Ours and PEFT's each against float64, within twice PEFT's (torch's fp32) error: two fp32 computations that
    # sum in different orders can differ by more than any fixed tolerance on another CPU.
    x = torch.randn(3, 11, 40)
    grad_out = torch.randn(3, 11, 36)
    exact = copy.deepcopy(ours).double()
    results = {}
    for name, layer, a, b, bias in (
        ("ours", ours, ours.lora_A, ours.lora_B, ours.bias),
        ("peft", peft_model, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
         peft_layer.base_layer.bias),
        ("float64", exact, exact.lora_A, exact.lora_B, exact.bias),
    ):
        x_leaf = x.to(a.dtype, copy=True).requires_grad_()
        # float64 runs on the reference (the kernels compute fp32/fp16/bf16)
        rk.configure(backend="reference" if name == "float64" else "triton")
        y = layer(x_leaf)
        y.backward(grad_out.to(y.dtype))
        results[name] = {"y": y.detach(), "dx": x_leaf.grad, "dA": a.grad, "dB": b.grad, "dbias": bias.grad}
    for key in results["ours"]:
        assert_within_torch_error(key, results["ours"][key], results["float64"][key], results["peft"][key])


def test_autocast_on_cpu_computes_in_bf16_with_fp32_gradients():
    torch.manual_seed(0)
    layer = rk.LoRALinear(16, 8, r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    # bf16 inputs (one rounding of each factor), fp32 accumulation, one rounding of y into bf16; the low-rank
    # branch's S is rounded to bf16 too: 4 bf16 roundings per product, K + r + 2 fp32 terms.
    magnitude = linear_magnitude(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale, layer.bias)
    bound = rounding_bound(torch.bfloat16, 4, magnitude) + rounding_bound(torch.float32, 16 + 4 + 2, magnitude)
    assert_within_bound("y", y, F.linear(x.double(), layer.to_linear().weight.double(), layer.bias.double()), bound)
