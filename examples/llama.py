"""A Llama-style decoder for the pre-training example, the architecture the ReLoRA paper pre-trains.

    tokens -> wte -> n_layer x Block -> norm_f -> lm_head (its own matrix) -> logits

    Block(x):  x = x + attn(input_norm(x))     RMSNorm; q, k, v, o projections; rotary positions on q and k;
                                               causal F.scaled_dot_product_attention
               x = x + mlp(post_attn_norm(x))  SwiGLU: down(silu(gate(x)) * up(x))

No biases anywhere and no position embedding: positions enter through the rotation of q and k. The conventions are
those of Hugging Face's LlamaForCausalLM, so that examples/export.py maps the weights one to one, without permuting
q and k: rotary in the rotate_half form (the two halves of each head's dimensions paired, inverse frequencies
theta^(-2i/head_dim)), RMSNorm computed in fp32 with the weight applied after it, SiLU gate.

The head is untied (lm_head has its own weight), as in the ReLoRA paper's LLaMA models (their configs leave
tie_word_embeddings at Hugging Face's default, False) and in LLaMA itself; the GPT-2 model in model.py keeps
GPT-2's tied head.

Every block's seven linears (q, k, v, o, gate, up, down) are LoRA targets (LORA_TARGETS), as in the official ReLoRA
code; the embedding, the norms and the head stay full-rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from model import CausalLM

LORA_TARGETS = r"h\.\d+\.(attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate_size: int = 688
    rms_norm_eps: float = 1e-6  # the official ReLoRA configs' rms_norm_eps
    rope_theta: float = 10000.0


# Model shapes. llama-60m / -130m / -350m: hidden size, intermediate size, heads and layers of the ReLoRA paper's
# LLaMA models (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates", table of model sizes), read
# from the official repository's configs (Guitaricet/relora, configs/llama_60m.json, llama_130m.json,
# llama_350m.json: hidden 512/768/1024, intermediate 1376/2048/2736, heads 8/12/16, layers 8/12/24,
# max_sequence_length 1024, rms_norm_eps 1e-6, vocab_size 32100, the T5 tokenizer's). The parameter counts in the
# names are with that vocabulary. llama-tiny is sized like the GPT-2 tiny
# preset (same width, depth and context; the SwiGLU's 688 = 8/3 * 256 rounded up to a multiple of 16 keeps the
# MLP's parameter count near GPT-2's 4x).
PRESETS = {
    "llama-tiny": dict(n_layer=4, n_head=4, n_embd=256, intermediate_size=688, block_size=256),
    "llama-60m": dict(n_layer=8, n_head=8, n_embd=512, intermediate_size=1376, block_size=1024),
    "llama-130m": dict(n_layer=12, n_head=12, n_embd=768, intermediate_size=2048, block_size=1024),
    "llama-350m": dict(n_layer=24, n_head=16, n_embd=1024, intermediate_size=2736, block_size=1024),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves: rotary's pairing of dimension i with i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(T: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inverse frequency, (T, head_dim), each frequency repeated over both halves.
    Computed in fp32 on every call (cheap next to attention), so the model holds no buffers: nothing to re-create
    when it is built on the meta device and loaded with assign=True."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the normalisation in fp32 whatever the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head}) with an even "
                             "head dimension (rotary pairs the dimensions)")
        self.n_head, self.theta = config.n_head, config.rope_theta
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = (proj(x).view(B, T, self.n_head, hd).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))
        cos, sin = rotary_cos_sin(T, hd, self.theta, x.device, q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x):
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))


class Llama(CausalLM):
    """The example's model interface (as model.GPT): forward(idx, targets) -> (logits, loss), generate, num_params,
    the blocks in .h (one FSDP unit each)."""

    lora_targets = LORA_TARGETS
    tied_head = False

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # N(0, 0.02) for every matrix, as Hugging Face's LlamaForCausalLM (initializer_range) and the official
        # ReLoRA code initialise them; the norms start at 1.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward_logits(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.norm_f(x))
