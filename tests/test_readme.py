"""Every ```python snippet of README.md runs as written, each in a fresh namespace (a reader copies them one by one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_the_snippets_the_docs_promise():
    text = "\n".join(SNIPPETS)
    for call in ("rk.lora_linear(", "rk.LoRALinear(", "rk.apply_lora(", "torch.compile(", "torch.autocast(",
                 "rk.save_peft_adapter(", "rk.load_peft_adapter(", "peft.PeftModel.from_pretrained(", "ReLoRA(",
                 "ReLoRACallback(", "jagged_cosine_scheduler("):
        assert call in text, f"no README snippet shows {call}"


def _snippet(index: int):
    """A snippet that trains with the Hugging Face Trainer is slow (the `slow` marker, tests/test_slow_marker.py)."""
    marks = [pytest.mark.slow] if "Trainer(" in SNIPPETS[index] else []
    return pytest.param(index, marks=marks, id=SNIPPETS[index].splitlines()[-1][:40])


@pytest.mark.parametrize("index", [_snippet(i) for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    monkeypatch.delenv("RELORA_KERNELS_BACKEND", raising=False)  # what a user gets by default
    torch.manual_seed(0)
    torch._dynamo.reset()
    exec(compile(SNIPPETS[index], f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
