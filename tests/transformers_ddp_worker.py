"""Run by tests/test_transformers_integration.py under `torchrun --nproc_per_node=2`: a tiny GPT-2 trained by the
Trainer on gloo with ReLoRACallback(restart_every=2) for 3 steps. Each rank saves, right after every optimizer step
and the callback, its parameters and the first token ids it trained on, to OUT_DIR/rank{rank}.pt.

Before the callback each rank draws a rank-dependent number of values from torch's default generator, so the
ranks' generators disagree at the restart: only a re-initialisation that does not use them leaves the ranks equal.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import transformers

import relora_kernels as rk
from relora_kernels.integrations.transformers import ReLoRACallback, jagged_cosine_scheduler

OUT_DIR = sys.argv[1]
RANK = int(os.environ["RANK"])
VOCAB, SEQ, BATCH, STEPS, RESTART_EVERY = 96, 16, 2, 3, 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class DivergeGenerators(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        torch.rand(1 + 7 * RANK)


class SaveParameters(transformers.TrainerCallback):
    def __init__(self, model):
        self.first_ids = []
        self.steps = {}
        model.register_forward_pre_hook(self.record_ids, with_kwargs=True)

    def record_ids(self, module, args, kwargs):
        self.first_ids.append(kwargs["input_ids"][0].clone())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.save({"steps": self.steps, "first_ids": self.first_ids}, os.path.join(OUT_DIR, f"rank{RANK}.pt"))


def main():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_layer=1, n_head=2, n_embd=32,
                                      bos_token_id=0, eos_token_id=0)
    model = rk.apply_lora(transformers.GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"], r=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = jagged_cosine_scheduler(optimizer, max_steps=STEPS, warmup_steps=1, restart_every=RESTART_EVERY,
                                        restart_warmup_steps=0)
    args = transformers.TrainingArguments(
        output_dir=OUT_DIR, max_steps=STEPS, per_device_train_batch_size=BATCH, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, ddp_backend="gloo", seed=0, logging_steps=1,
        ddp_find_unused_parameters=False)
    callbacks = [DivergeGenerators(), ReLoRACallback(RESTART_EVERY, prune_ratio=0.5, seed=0), SaveParameters(model)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks,
                                   optimizers=(optimizer, scheduler))
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()


def tear_down_process_group():
    """Free the Trainer's DDP wrapper first, then destroy the process group while Python is fully alive.

    Otherwise the wrapper's Reducer can hold the group's last reference, and its destructor joins gloo's worker
    threads while holding the GIL that one of them needs to free a finished collective: a hang (or, left to
    interpreter shutdown, an abort, "terminate called without an active exception"; pytorch issue #190489).
    """
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
    assert not alive, "a DistributedDataParallel wrapper outlived the Trainer"
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    tear_down_process_group()
