"""Export a pre-training run as a Hugging Face model: the newest checkpoint that loads, LoRA merged into the weights.

    python examples/export.py out/tiny-relora                  # writes out/tiny-relora/hf/
    python examples/export.py out/llama-tiny-relora --out my_model

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/tiny-relora/hf")   # GPT2LMHeadModel / LlamaForCausalLM

The folder holds config.json, model.safetensors (fp32, as trained) and the run's tokenizer (tokenizer.json,
tokenizer_config.json), written by transformers' own save_pretrained, so any version that reads them loads it.
The checkpoint is chosen as a resume would choose it (broken ones skipped, and left where they are), and either
kind loads: one file, or the shards written under --fsdp (read here in one process). The weights map one to one:

    GPT-2  model.GPT's names under transformer.*, the four block linears transposed into GPT-2's Conv1D layout
           (in_features, out_features); the head tied to the embedding; GELU with the tanh approximation
           ("gelu_new"), LayerNorm eps 1e-5, dropout 0
    Llama  llama.Llama follows LlamaForCausalLM's conventions (rotate_half rotary, fp32 RMSNorm, SiLU gate), so q
           and k are copied as they are; the head untied; RMSNorm eps and rotary theta from the model's config

The exported vocabulary is the model's, padded to a multiple of 64: the padding rows are never predicted in
training (never a target), and the tokenizer never produces them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import fsdp as sharded
import torch
import torch.distributed.checkpoint as dcp
from checkpoints import newest_loadable_checkpoint
from config import UsageError, is_llama
from data import EOT
from llama import Llama, LlamaConfig
from model import GPT, GPTConfig
from safetensors.torch import load_model

import relora_kernels as rk
from relora_kernels.utils import atomic_folder

# The GPT-2 linears that Hugging Face's GPT2 holds as Conv1D, whose weight is the transpose of nn.Linear's.
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_NAMES = {"attn.": "self_attn.", "input_norm.": "input_layernorm.", "post_attn_norm.": "post_attention_layernorm."}


class TrainedRun:
    """A run's newest loadable checkpoint, loaded on the CPU: the model (LoRA merged unless merge=False), its
    tokenizer."""

    def __init__(self, run_dir: str | Path, log=print, merge: bool = True):
        run_dir = Path(run_dir).expanduser()
        if not (run_dir / "ckpt").is_dir():
            raise UsageError(f"{run_dir}: no ckpt/ folder; give the --out_dir of a pre-training run")
        ckpt, state = newest_loadable_checkpoint(run_dir, log, move_broken=False)
        if ckpt is None:
            raise UsageError(f"{run_dir}: no complete checkpoint in {run_dir / 'ckpt'}")
        self.ckpt, self.state, self.step = ckpt, state, state["step"]
        self.config = state["config"]
        self.llama = is_llama(self.config["preset"])
        config_class = LlamaConfig if self.llama else GPTConfig
        known = {f.name for f in fields(config_class)}
        self.model_cfg = config_class(**{k: v for k, v in state["model_config"].items() if k in known})
        model = (Llama if self.llama else GPT)(self.model_cfg)
        if state["lora_on"]:  # the checkpoint holds LoRALinear layers: W, A, B under their names
            rk.apply_lora(model, model.lora_targets, r=self.config["lora_r"], alpha=self.config["lora_alpha"])
        if sharded.is_sharded(ckpt):
            load_sharded_weights(ckpt, model)
        else:
            load_model(model, str(ckpt / "model.safetensors"), device="cpu")
        # W + scale * B @ A in every LoRA layer, as plain nn.Linear layers
        self.model = (rk.merge_lora(model) if merge else model).eval()
        data = state["data"]
        self.eot = data.get("eot", EOT)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(data["tokenizer"])

    def hf_tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, eos_token=self.eot, bos_token=self.eot,
                                       unk_token=self.eot if self.eot == EOT else None,
                                       model_max_length=self.model_cfg.block_size)

    def hf_model(self):
        """The transformers model holding these weights (fp32)."""
        import transformers

        cfg, eot_id = self.model_cfg, self.tokenizer.token_to_id(self.eot)
        ours = {name: t.detach() for name, t in self.model.state_dict().items()}
        if self.llama:
            hf_cfg = transformers.LlamaConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
                rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                bos_token_id=eot_id, eos_token_id=eot_id)
            model = transformers.LlamaForCausalLM(hf_cfg)
            theirs = {llama_hf_name(name): t for name, t in ours.items()}
        else:
            hf_cfg = transformers.GPT2Config(
                vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id)
            model = transformers.GPT2LMHeadModel(hf_cfg)
            theirs = {gpt2_hf_name(name): t.t() if is_conv1d_weight(name) else t for name, t in ours.items()}
        # strict: every weight of the transformers model is set, and nothing of ours is left over.
        missing, unexpected = model.load_state_dict(theirs, strict=False)
        missing = [name for name in missing if not (name == "lm_head.weight" and not self.llama)]  # tied
        if missing or unexpected:
            raise RuntimeError(f"weight names do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if not self.llama:
            model.tie_weights()
        return model.eval()

    def export(self, out: Path, log=print) -> Path:
        """Write the Hugging Face folder atomically: a crash leaves the previous export, or none, never a part."""
        model, tokenizer = self.hf_model(), self.hf_tokenizer()
        out = Path(out).expanduser()
        with atomic_folder(out, out.with_name(f".tmp-{out.name}-{os.getpid()}")) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log(f"exported step {self.step} ({self.ckpt}) as {type(model).__name__} to {out}: "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters"
            + (", LoRA merged" if self.state["lora_on"] else ""))
        return out


def is_conv1d_weight(name: str) -> bool:
    """h.<i>.attn.c_attn.weight and the like: a block linear's weight, which GPT-2's Conv1D holds transposed."""
    parts = name.split(".")
    return parts[0] == "h" and parts[-1] == "weight" and ".".join(parts[2:-1]) in CONV1D


def gpt2_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"transformer.{name}"


def llama_hf_name(name: str) -> str:
    if name == "wte.weight":
        return "model.embed_tokens.weight"
    if name == "norm_f.weight":
        return "model.norm.weight"
    if name.startswith("h."):
        _, index, rest = name.split(".", 2)
        for ours, theirs in LLAMA_NAMES.items():
            rest = rest.replace(ours, theirs, 1) if rest.startswith(ours) else rest
        return f"model.layers.{index}.{rest}"
    return name  # lm_head.weight


def load_sharded_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """The model's part of a --fsdp checkpoint (DCP shards, resharded to one process), read without a process group
    and without running code from the files (fsdp.py's reader and planner)."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=sharded.SafeReader(ckpt), planner=sharded.SafeLoadPlanner(), no_dist=True)
    model.load_state_dict(state["model"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run's --out_dir (it holds ckpt/)")
    parser.add_argument("--out", help="the folder to write (default: RUN/hf); an existing export there is replaced")
    args = parser.parse_args(argv)
    name = Path(sys.argv[0]).name
    try:
        run = TrainedRun(args.run)
        run.export(Path(args.out) if args.out else Path(args.run) / "hf")
        return 0
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
