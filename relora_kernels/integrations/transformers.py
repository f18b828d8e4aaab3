"""ReLoRA inside the Hugging Face `Trainer`: a callback for the restarts and a jagged cosine learning-rate scheduler.

    import relora_kernels as rk
    from relora_kernels.integrations.transformers import ReLoRACallback, jagged_cosine_scheduler

    rk.apply_lora(model, ["c_attn", "c_proj", "c_fc"], r=64)            # Llama: q_proj, ..., down_proj
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = jagged_cosine_scheduler(optimizer, max_steps=10_000, warmup_steps=500, restart_every=2_000,
                                        restart_warmup_steps=100)
    trainer = transformers.Trainer(model, args, train_dataset=data, optimizers=(optimizer, scheduler),
                                   callbacks=[ReLoRACallback(restart_every=2_000)])

`args.max_steps` must be the scheduler's `max_steps`, and the scheduler and the callback need the same
`restart_every`: the callback restarts the factors, the scheduler re-warms the learning rate after each restart.

A full-rank warm start is two stages, two Trainers: a full-rank run, then `apply_lora` on the trained model and a
LoRA run with the callback (README, "With the Hugging Face Trainer"). It cannot be one run because the Trainer
builds its optimizer once, from the parameters that require grad when training starts: layers swapped in later
would not be in it, and the replaced full-rank weights would still be.

This module imports transformers; `relora_kernels` itself never imports it.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:
    from transformers import TrainerCallback
except ImportError as error:  # the package installs without its extras
    raise ImportError(
        f"relora_kernels.integrations.transformers needs Hugging Face transformers (and accelerate, which its Trainer "
        f"runs on): pip install 'relora-kernels[transformers]' ({error})"
    ) from error

from .._validate import check_choice, check_fraction, check_int
from ..modules import LoRALinear
from ..relora import PRUNE_METHODS, ReLoRA, jagged_cosine

__all__ = ["ReLoRACallback", "jagged_cosine_scheduler"]


class ReLoRACallback(TrainerCallback):
    """Runs ReLoRA's restarts in a `transformers.Trainer`: after each optimizer step whose global step is a multiple
    of `restart_every`, every LoRALinear merges B @ A into its weight and re-draws its factors, and the Adam moments
    of all lora_A / lora_B parameters in the Trainer's optimizer are pruned — `relora_kernels.relora.ReLoRA.step`
    on the model and optimizer the Trainer holds, with the same arguments and the same seeds.

    A restart depends only on the global step and these arguments, so nothing needs saving: a run resumed with
    `trainer.train(resume_from_checkpoint=...)` restarts at the same steps with the same re-initialisations, and
    each DDP rank draws the same factors without communicating. `restarts` counts the restarts up to the current
    global step.

    No restart follows the run's last step (`state.max_steps`): it would merge and re-draw for nothing.

    The model and optimizer are checked when training begins: ValueError if the model has no LoRALinear layer or
    the optimizer lacks some of their factors, TypeError for an optimizer whose state ReLoRA cannot prune (see
    `relora_kernels.relora.PRUNABLE_STATE`); DeepSpeed and FSDP, which shard the parameters a merge needs whole,
    are refused. At the first restart it warns once (RuntimeWarning) if the learning rate of the step after it is
    not below half of the restart step's, as with a plain cosine or a constant rate: the re-initialised factors
    would take full-size first steps on freshly pruned state. `jagged_cosine_scheduler` with the same
    `restart_every` drops it to 0 and re-warms it.
    """

    def __init__(self, restart_every: int, prune_ratio: float = 0.99, prune_method: str = "magnitude", seed: int = 0):
        self.restart_every = check_int("restart_every", restart_every, 1)
        self.prune_ratio = check_fraction("prune_ratio", prune_ratio)
        self.prune_method = check_choice("prune_method", prune_method, PRUNE_METHODS)
        self.seed = check_int("seed", seed, 0)
        self._relora: ReLoRA | None = None
        self._lr_next: list[float] | None = None  # the optimizer's learning rates for the coming step
        self._checked_rewarm = False

    @property
    def restarts(self) -> int:
        return 0 if self._relora is None else self._relora.restarts

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.deepspeed or args.fsdp:
            raise ValueError("ReLoRACallback does not support DeepSpeed or FSDP: a restart merges each layer's full "
                             "weight and factors, which those shard across ranks")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be the Trainer's nn.Module, got {type(model).__name__}")
        if optimizer is None:
            raise TypeError("optimizer is None at on_train_begin: ReLoRACallback needs the Trainer's optimizer")
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        if not layers:
            raise ValueError("model has no LoRALinear layers: call relora_kernels.apply_lora(model, ...) before "
                             "building the Trainer")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [f"{name}.{factor}" for name, layer in layers.items() for factor in ("lora_A", "lora_B")
                   if id(getattr(layer, factor)) not in in_optimizer]
        if missing:
            shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise ValueError(f"optimizer lacks {len(missing)} LoRA factors of the model ({shown}): build it from "
                             "the parameters that require grad after apply_lora")
        self._relora = ReLoRA(model, optimizer, restart_every=self.restart_every, prune_ratio=self.prune_ratio,
                              prune_method=self.prune_method, seed=self.seed, max_steps=state.max_steps or None)
        # A resumed run has already done the restarts of the steps before its checkpoint.
        self._relora.restarts = state.global_step // self.restart_every

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self._relora is None:
            raise RuntimeError("ReLoRACallback.on_step_end before on_train_begin: add it to the Trainer's callbacks")
        # The Trainer has stepped its scheduler already: the optimizer holds the next step's learning rates, and
        # the ones kept at the previous step's end are those this step ran at.
        lr_used, self._lr_next = self._lr_next, None
        if optimizer is not None:
            self._lr_next = [group["lr"] for group in optimizer.param_groups]
        if self._relora.step(state.global_step) and not self._checked_rewarm and lr_used and self._lr_next:
            self._checked_rewarm = True
            kept = [float(after) / float(before) for before, after in zip(lr_used, self._lr_next, strict=True)
                    if float(before) > 0]
            if kept and max(kept) >= 0.5:
                warnings.warn(f"ReLoRACallback: the learning rate after the restart at step {state.global_step} is "
                              f"{max(kept):.0%} of the restart step's: the scheduler does not drop and re-warm at "
                              "restarts, so the new factors take full-size first steps. Use "
                              "jagged_cosine_scheduler(optimizer, ..., restart_every="
                              f"{self.restart_every}, restart_warmup_steps=...)", RuntimeWarning, stacklevel=2)


def jagged_cosine_scheduler(optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_steps: int,
                            restart_every: int, restart_warmup_steps: int,
                            min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at scheduler step `step` is `relora_kernels.relora.jagged_cosine(step, ...)`
    with these arguments (checked here, ValueError naming the bad one). The Trainer steps it once per optimizer
    step, so optimizer step `s` (1-based) runs at lr * jagged_cosine(s - 1): the step right after a restart at
    `k * restart_every` runs at 0, and the learning rate climbs back over `restart_warmup_steps`.
    """
    settings = {"max_steps": max_steps, "warmup_steps": warmup_steps, "restart_every": restart_every,
                "restart_warmup_steps": restart_warmup_steps, "min_lr_ratio": min_lr_ratio}
    jagged_cosine(0, **settings)  # checks the arguments before LambdaLR sets any learning rate
    # A partial keeps its arguments out of __dict__, which is all LambdaLR saves of a callable: a checkpoint then
    # restores only the step count, and the schedule is always the one given here.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(jagged_cosine, **settings))
