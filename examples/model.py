"""A GPT-2 style decoder, small enough to read in one sitting (after nanoGPT's model.py).

    tokens -> wte + wpe -> n_layer x Block -> ln_f -> lm_head (tied to wte) -> logits

    Block(x):  x = x + attn(ln_1(x))      causal self-attention through F.scaled_dot_product_attention
               x = x + mlp(ln_2(x))       Linear(d, 4d) -> GELU -> Linear(4d, d)

The four Linear layers of every block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are what ReLoRA turns into
LoRA layers (LORA_TARGETS); the embeddings, the LayerNorms and the tied head stay full-rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# A regex matched in full against module names by relora_kernels.apply_lora: every attention and MLP linear.
LORA_TARGETS = r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0  # 0 for pre-training, as in nanoGPT
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2


# Model shapes. vocab_size is the tokenizer's (set by the training script), so it is not part of a preset.
PRESETS = {
    # ~4.5M parameters with a 4096-token vocabulary: trains visibly in minutes on a laptop CPU.
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    # GPT-2 small and medium (124M and 355M with GPT-2's 50257-token vocabulary).
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CausalLM(nn.Module):
    """What the example's models share (GPT here, llama.Llama): the loss, sampling and the parameter count. A
    subclass builds .wte, .h (its blocks: one FSDP unit each), .lm_head and returns logits(idx) from forward_logits."""

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size {self.config.block_size}")
        logits = self.forward_logits(idx)
        if targets is None:
            return logits, None
        # Cross-entropy in fp32 whatever the autocast dtype: the softmax over the vocabulary is where bf16 hurts.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, trainable: bool | None = None) -> int:
        """Parameters counted once (a tied head is the embedding); trainable=True/False counts only those."""
        return sum(p.numel() for p in self.parameters() if trainable is None or p.requires_grad == trainable)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50, generator=None):
        """Sample max_new_tokens after idx (B, T); the context is cropped to block_size."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
        return idx


class GPT(CausalLM):
    lora_targets = LORA_TARGETS
    tied_head = True  # lm_head.weight is wte.weight

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (vocab, d) matrix embeds and un-embeds

        # GPT-2 init: N(0, 0.02), and the projections that write into the residual stream scaled down by
        # 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward_logits(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """One token per row (B, 1) drawn from the last position's logits (B, vocab): temperature, then the top_k."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
