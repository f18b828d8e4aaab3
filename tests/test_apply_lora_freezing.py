"""apply_lora's train_others: the default keeps every other parameter trainable (ReLoRA pre-training); False trains
only the LoRA factors, and then the trainable parameters are exactly PEFT's for the same targets."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers

import relora_kernels as rk

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=4))


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


def trainable(model) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def peft_trainable(model, targets, r) -> dict[str, int]:
    """PEFT's trainable parameters under our names: base_model.model.X.lora_A.default.weight -> X.lora_A."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                             fan_in_fan_out=isinstance(model, transformers.GPT2LMHeadModel))
    wrapped = peft.get_peft_model(model, config)
    names = {}
    for name, count in trainable(wrapped).items():
        name = name.removeprefix("base_model.model.")
        for factor in ("lora_A", "lora_B"):
            name = name.replace(f".{factor}.default.weight", f".{factor}")
        names[name] = count
    return names


@pytest.mark.parametrize("build, targets", [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)],
                         ids=["gpt2", "llama"])
def test_train_others_false_trains_exactly_what_peft_trains(build, targets):
    model = build()
    theirs = peft_trainable(copy.deepcopy(model), targets, r=4)
    ours = trainable(rk.apply_lora(model, targets, r=4, alpha=8, train_others=False))
    assert sum(ours.values()) == sum(theirs.values())
    assert ours == theirs  # the same parameters, not only the same count
    assert all(name.endswith((".lora_A", ".lora_B")) for name in ours)


@pytest.mark.parametrize("build, targets", [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)],
                         ids=["gpt2", "llama"])
def test_default_freezes_only_the_replaced_weights(build, targets):
    model = build()
    before = trainable(model)
    rk.apply_lora(model, targets, r=4)
    after = trainable(model)
    frozen = {name.removesuffix(".weight") for name in before} - {name.removesuffix(".weight") for name in after}
    layers = {name for name, m in model.named_modules() if isinstance(m, rk.LoRALinear)}
    # Exactly the replaced layers' weights left the trainable set; embeddings, norms, biases and the head stayed.
    assert frozen == layers
    factors = {name: count for name, count in after.items() if name.endswith((".lora_A", ".lora_B"))}
    assert sum(after.values()) == sum(before.values()) - sum(before[f"{name}.weight"] for name in layers) + sum(
        factors.values())


def test_frozen_biases_get_no_gradient_and_the_factors_do():
    model = rk.apply_lora(tiny_gpt2(), GPT2_TARGETS, r=4, train_others=False)
    torch.nn.init.normal_(model.transformer.h[0].attn.c_attn.lora_B)  # B = 0 would leave A's gradient zero
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0 or "lora_A" in name, name
        else:
            assert p.grad is None, name
    assert model.transformer.h[0].attn.c_attn.lora_A.grad.abs().sum() > 0


def test_train_others_must_be_a_bool():
    with pytest.raises(TypeError, match="train_others must be True or False"):
        rk.apply_lora(tiny_gpt2(), GPT2_TARGETS, r=4, train_others="no")
