"""Sample text from a pre-training run: its newest checkpoint that loads, LoRA merged, on the CPU or a GPU.

    python examples/generate.py out/tiny-relora --prompt "def "
    python examples/generate.py out/llama-tiny-relora --prompt "import os" --tokens 100 --seed 7 --temperature 0.7

The same --seed, prompt and settings give the same text on the same machine (one generator draws every token).
The text printed is the prompt followed by the sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from config import UsageError, pick_device
from export import TrainedRun


def generate(run: TrainedRun, prompt: str, tokens: int, seed: int, temperature: float = 0.8, top_k: int | None = 50,
             device: torch.device | None = None) -> str:
    """The prompt and `tokens` tokens sampled after it (temperature, then the top_k most likely)."""
    device = device or torch.device("cpu")
    ids = run.tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise UsageError("--prompt is empty: give at least one token of text")
    model = run.model.to(device)
    idx = torch.tensor([ids], device=device)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator(device).manual_seed(seed))
    return run.tokenizer.decode(out[0].tolist())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run's --out_dir (it holds ckpt/)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to sample (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    parser.add_argument("--temperature", type=float, default=0.8, help="logits divided by this (default 0.8)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (default 50; "
                                                               "0: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    args = parser.parse_args(argv)
    name = Path(sys.argv[0]).name
    try:
        if args.tokens < 1:
            raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
        if not args.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {args.temperature}")
        if args.top_k < 0:
            raise UsageError(f"--top_k must be >= 0, got {args.top_k}")
        if not 0 <= args.seed < 2**64:
            raise UsageError(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
        device = pick_device(args.device, 0)
        run = TrainedRun(args.run, log=lambda message: print(message, file=sys.stderr))
        print(f"sampling {args.tokens} tokens from step {run.step} of {args.run} (seed {args.seed})",
              file=sys.stderr)
        print(generate(run, args.prompt, args.tokens, args.seed, args.temperature, args.top_k or None, device))
        return 0
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
