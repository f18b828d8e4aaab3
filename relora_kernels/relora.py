"""ReLoRA training machinery: optimizer-state pruning, the jagged cosine schedule, and the restart controller.

At each ReLoRA restart the LoRA factors are merged into the frozen weight and re-initialised, so the Adam moments
that were built up for the old factors no longer describe the new ones. ReLoRA therefore

    merges and re-initialises      LoRALinear.merge_and_reinit, one seed per (run seed, restart, layer)
    prunes the optimizer state     prune_optimizer_state_: keep the largest (1 - ratio) of exp_avg / exp_avg_sq
    re-warms the learning rate     jagged_cosine: a cosine envelope that drops to 0 at each restart and
                                   climbs back linearly over restart_warmup_steps

The controller `ReLoRA` does the first two at the right steps; the schedule goes to a LambdaLR.

The short re-warmup is what makes the pruned state safe: right after a reset an element may keep its exp_avg but
lose its exp_avg_sq, so the first few updates are unreliable and must be taken with a small learning rate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from ._validate import check_choice, check_fraction, check_int
from .distributed import fsdp_managed, local_tensor
from .modules import LoRALinear
from .utils import hash_seed

# Adam's moments, and amsgrad's running maximum of the second one (left alone it would keep the old factors' large
# denominators, so pruning exp_avg_sq would change nothing); the step counter is left as it is.
PRUNED_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PRUNE_METHODS = ("magnitude", "random", "zero")


# --------------------------------------------------------------------------------------------------------------
# Optimizer-state pruning
# --------------------------------------------------------------------------------------------------------------


def _num_kept(ratio: float, numel: int) -> int:
    # Python's round: halves go to the even integer. (1 - ratio) is computed in float64 as written, so e.g.
    # ratio=0.95 on 10 elements keeps round(0.5000000000000004) = 1.
    return round((1.0 - ratio) * numel)


def _prune_tensor_(state: torch.Tensor, ratio: float, method: str) -> None:
    numel = state.numel()
    n_keep = _num_kept(ratio, numel)
    if method == "zero" or n_keep == 0:
        state.zero_()
        return
    if n_keep >= numel:
        return
    if method == "magnitude":
        # topk picks exactly n_keep indices even when several elements tie at the threshold; a `>= threshold`
        # compare would keep every tied element and so more than n_keep.
        keep = torch.topk(state.abs().flatten(), n_keep, sorted=False).indices
    else:
        # The default generator of the state's device, so torch.manual_seed reproduces the draw.
        keep = torch.randperm(numel, device=state.device)[:n_keep]
    keep_mask = torch.zeros(numel, dtype=torch.bool, device=state.device)
    keep_mask.scatter_(0, keep, True)
    # masked_fill_ writes through any strides, so a non-contiguous state tensor is pruned in place too.
    state.masked_fill_(~keep_mask.view(state.shape), 0)


def prune_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    ratio: float = 0.99,
    method: str = "magnitude",
) -> int:
    """Prune, in place, the Adam moments `exp_avg` and `exp_avg_sq` (and amsgrad's `max_exp_avg_sq`) of `params`
    in `optimizer`; returns the number of state tensors pruned (0 for an optimizer without them, e.g. SGD).

    Each state tensor is pruned on its own: all but `n_keep = round((1 - ratio) * numel)` of its elements are set
    to 0 (Python's round, halves to even; ratio=0 keeps everything, ratio=1 zeros everything).

        method="magnitude"  keeps the n_keep elements of largest |value|, with their values unchanged; ties at
                            the threshold are broken by torch.topk, never keeping more than n_keep
        method="random"     keeps n_keep elements drawn uniformly without replacement from torch's default
                            generator on the state's device (torch.manual_seed reproduces it)
        method="zero"       zeros the tensors completely

    Sharded state (DTensors, as FSDP2's parameters give Adam) is pruned within each shard: every rank ranks (or
    draws, or zeros) only the elements it holds, with n_keep from its local numel, so pruning needs no
    communication. Magnitude pruning therefore keeps each shard's largest elements rather than the whole tensor's
    (a shard of small values keeps as large a fraction as one of large values), and "random" draws from each
    rank's own generator.

    Only the keys above are touched: `state["step"]` (and so Adam's bias correction), any other key, and the
    state of every parameter not in `params` stay exactly as they were. A parameter with no state yet (never
    stepped) is skipped; a parameter listed twice is pruned once.

    Raises ValueError if ratio is not a real number in [0, 1], if method is not one of PRUNE_METHODS, or if a
    parameter is not in the optimizer's param_groups (checked for all of them before anything is changed).
    """
    ratio = check_fraction("ratio", ratio)
    check_choice("method", method, PRUNE_METHODS)
    if isinstance(params, torch.Tensor):
        # list(tensor) would silently iterate over its rows.
        raise TypeError("params must be an iterable of tensors, not a single tensor; wrap it in a list")

    # Parameters are compared by identity, as the optimizer keys its state by the tensor object.
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    unique_params = list({id(p): p for p in params}.values())
    for index, p in enumerate(unique_params):
        if id(p) not in in_optimizer:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"params[{index}] ({shape}) is not in the optimizer's param_groups")

    pruned = 0
    with torch.no_grad():
        for p in unique_params:
            # .get, not [], because optimizer.state is a defaultdict and [] would add an empty entry.
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in PRUNED_STATE_KEYS:
                if isinstance(state.get(key), torch.Tensor):
                    # The local shard is a view of the DTensor's storage, so pruning it in place prunes the state.
                    _prune_tensor_(local_tensor(state[key]), ratio, method)
                    pruned += 1
    return pruned


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------------------


def jagged_cosine(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning-rate multiplier of ReLoRA's jagged cosine schedule, for torch.optim.lr_scheduler.LambdaLR.

    With `step` counted from 0 (as LambdaLR passes it):

        step < warmup_steps                 step / warmup_steps                               initial warmup 0 -> 1
        otherwise                           envelope(step), except
        step = k * restart_every + j,       envelope(step) * j / restart_warmup_steps         restart warmup
          k >= 1, 0 <= j < restart_warmup_steps

        envelope(step) = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * t)),
        t = clamp((step - warmup_steps) / (max_steps - warmup_steps), 0, 1)

    So the multiplier is 0 at each restart step and climbs back linearly to the envelope, which it rejoins at
    j = restart_warmup_steps; past max_steps the envelope stays at min_lr_ratio (restarts still dip).

    The initial warmup takes precedence: a restart falling inside it (restart_every < warmup_steps) does not dip,
    and a restart warmup that straddles the end of the initial warmup continues its own ramp from the j it has
    reached. restart_warmup_steps=0 means no dip at restarts.

    Raises ValueError unless max_steps > warmup_steps >= 0, restart_every >= 1,
    0 <= restart_warmup_steps <= restart_every, 0 <= min_lr_ratio <= 1 and step >= 0 (steps are integers).
    """
    step = check_int("step", step, 0)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    max_steps = check_int("max_steps", max_steps, 1)
    if max_steps <= warmup_steps:
        raise ValueError(f"max_steps must be > warmup_steps ({warmup_steps}), got {max_steps}")
    restart_every = check_int("restart_every", restart_every, 1)
    restart_warmup_steps = check_int("restart_warmup_steps", restart_warmup_steps, 0)
    if restart_warmup_steps > restart_every:
        raise ValueError(f"restart_warmup_steps must be <= restart_every ({restart_every}), got {restart_warmup_steps}")
    check_fraction("min_lr_ratio", min_lr_ratio)

    if step < warmup_steps:
        return step / warmup_steps

    progress = min(max((step - warmup_steps) / (max_steps - warmup_steps), 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    # Same value as min_lr_ratio + (1 - min_lr_ratio) * cosine, but exact at both ends: 1.0 when cosine == 1
    # and min_lr_ratio when cosine == 0, whatever the rounding of 1 - min_lr_ratio.
    envelope = cosine + min_lr_ratio * (1.0 - cosine)

    restart_index, steps_since_restart = divmod(step, restart_every)
    if restart_index >= 1 and steps_since_restart < restart_warmup_steps:
        return envelope * steps_since_restart / restart_warmup_steps
    return envelope


# --------------------------------------------------------------------------------------------------------------
# The restart controller
# --------------------------------------------------------------------------------------------------------------


def restart_seed(seed: int, restart: int, layer: int) -> int:
    """The reinit seed of one layer at one restart: a hash of (run seed, restart index, layer index) below 2**63.

    A pure function of its arguments, so every DDP rank (and a resumed run) draws the same A with no broadcast.
    """
    return hash_seed(f"relora:{seed}:{restart}:{layer}")


class ReLoRA:
    """Merges, re-initialises and prunes at every `restart_every`-th optimizer step.

    Call `step(step)` after optimizer step number `step` (1-based). When `step % restart_every == 0` every
    LoRALinear in `model` (in `model.modules()` order) merges B @ A into its weight and re-draws A with the seed
    `restart_seed(seed, step // restart_every, layer_index)`, B becomes 0, and the optimizer state of all lora_A /
    lora_B parameters is pruned with `prune_optimizer_state_(ratio=prune_ratio, method=prune_method)`; it returns
    True. Otherwise it returns False and changes nothing. The learning-rate re-warmup belongs to the scheduler
    (`jagged_cosine` with the same `restart_every`).

    Under FSDP2 (fully_shard) every rank calls `step` and each layer restarts shard-locally: A is all-gathered once,
    each rank merges its own rows of W (never gathered), keeps its rows of the new A and zeros its rows of B (see
    LoRALinear.merge_and_reinit); the optimizer state is pruned within each shard (see prune_optimizer_state_).

    Everything a restart does depends only on the step number and the constructor's arguments, so `state_dict()`
    carries just the count of restarts done (for logging) and the settings, which `load_state_dict` checks.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, restart_every: int,
                 prune_ratio: float = 0.99, prune_method: str = "magnitude", seed: int = 0):
        self.restart_every = check_int("restart_every", restart_every, 1)
        self.prune_ratio = check_fraction("prune_ratio", prune_ratio)
        self.prune_method = check_choice("prune_method", prune_method, PRUNE_METHODS)
        self.seed = check_int("seed", seed, 0)
        self.model, self.optimizer = model, optimizer
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if not self.layers:
            raise ValueError("model has no LoRALinear layers: call apply_lora(model, ...) before ReLoRA(...)")
        # Checked here, not at the first restart: there prune_optimizer_state_ would raise after every layer merged.
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {id(m): name for name, m in model.named_modules()}
        missing = [names[id(m)] for m in self.layers if id(m.lora_A) not in in_optimizer or id(m.lora_B) not in
                   in_optimizer]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"the optimizer does not hold lora_A and lora_B of {shown}: build it after apply_lora, "
                             "over the model's trainable parameters")
        self.restarts = 0
        self._warned_nothing_to_prune = False

    def step(self, step: int) -> bool:
        step = check_int("step", step, 1)
        if step % self.restart_every != 0:
            return False
        restart = step // self.restart_every
        self._check_sharded()
        for index, layer in enumerate(self.layers):
            layer.merge_and_reinit(seed=restart_seed(self.seed, restart, index))
        lora_params = [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]
        pruned = prune_optimizer_state_(self.optimizer, lora_params, self.prune_ratio, self.prune_method)
        stepped = any(self.optimizer.state.get(p) for p in lora_params)  # a never-stepped optimizer has no state
        if stepped and not pruned and self.prune_ratio > 0 and not self._warned_nothing_to_prune:
            self._warned_nothing_to_prune = True
            warnings.warn(f"ReLoRA: {type(self.optimizer).__name__} holds no Adam moments "
                          f"({', '.join(PRUNED_STATE_KEYS)}) for the LoRA factors, so restarts merge and re-initialise "
                          "them but prune nothing", RuntimeWarning, stacklevel=2)
        self.restarts += 1
        return True

    def _check_sharded(self) -> None:
        # Unsharded FSDP2 parameters are the all-gathered copies, dropped at the next reshard: a restart there
        # would be lost without a trace.
        managed = fsdp_managed(self.model)
        for name, layer in self.model.named_modules():
            if name in managed and isinstance(layer, LoRALinear) and not layer._is_sharded():
                raise RuntimeError(f"ReLoRA.step: {name or 'the model'} is under fully_shard but holds unsharded "
                                   f"parameters (after unshard(), or a forward with reshard_after_forward=False); "
                                   f"restart after optimizer.step(), when FSDP2 holds them sharded, or reshard() "
                                   f"first")

    def _settings(self) -> dict:
        return {"restart_every": self.restart_every, "prune_ratio": self.prune_ratio,
                "prune_method": self.prune_method, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"restarts": self.restarts, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state[key] for key in self._settings()}
        if saved != self._settings():
            raise ValueError(f"ReLoRA state was saved with settings {saved}, this controller has {self._settings()}")
        self.restarts = int(state["restarts"])
