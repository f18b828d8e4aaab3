"""ReLoRA training machinery: optimizer-state pruning, the jagged cosine schedule, and the restart controller.

At each ReLoRA restart the LoRA factors are merged into the frozen weight and re-initialised, so the optimizer state
that was built up for the old factors no longer describes the new ones. ReLoRA therefore

    merges and re-initialises      LoRALinear.merge_and_reinit, one seed per (run seed, restart, layer)
    prunes the optimizer state     prune_optimizer_state_: one mask per parameter over all its per-element state
                                   (Adam's exp_avg and exp_avg_sq together), keeping the (1 - ratio) of elements
                                   whose update would be largest
    re-warms the learning rate     jagged_cosine: a cosine envelope that drops to 0 at each restart and
                                   climbs back linearly over restart_warmup_steps

The controller `ReLoRA` does the first two at the right steps; the schedule goes to a LambdaLR.

The moments of an element are pruned together, never one without the other: Adam divides the first moment by the
square root of the second, so an element that kept exp_avg and lost exp_avg_sq would take a step of lr * m / eps
(orders of magnitude above lr) on its next update, and a short re-warmup does not make that small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from ._validate import check_choice, check_fraction, check_int, is_dtensor
from .distributed import fsdp_managed, local_tensor
from .modules import LoRALinear
from .utils import hash_seed

PRUNE_METHODS = ("magnitude", "random", "zero")

# The per-element state of each optimizer ReLoRA knows, all of it pruned with one mask per parameter. Adam's
# amsgrad running maximum is there because, left alone, it would keep the old factors' large denominators; Adamax's
# exp_inf is its denominator. Scalars (Adam's step counter, NAdam's mu_product) are left as they are. An optimizer
# not listed here (or a subclass that keeps other per-element state) is refused: pruning part of its state, or
# none, in silence could leave a numerator without its denominator.
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
PRUNABLE_STATE = {
    torch.optim.Adam: _ADAM_STATE,
    torch.optim.AdamW: _ADAM_STATE,
    torch.optim.NAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.RAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.Adamax: ("exp_avg", "exp_inf"),
    torch.optim.SGD: ("momentum_buffer",),
}
# Every key pruned by some optimizer above.
PRUNED_STATE_KEYS = tuple(dict.fromkeys(key for keys in PRUNABLE_STATE.values() for key in keys))


# --------------------------------------------------------------------------------------------------------------
# Optimizer-state pruning
# --------------------------------------------------------------------------------------------------------------


def _num_kept(ratio: float, numel: int) -> int:
    # Python's round: halves go to the even integer. (1 - ratio) is computed in float64 as written, so e.g.
    # ratio=0.95 on 10 elements keeps round(0.5000000000000004) = 1.
    return round((1.0 - ratio) * numel)


def state_holder(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the per-parameter state: `optimizer` itself if ReLoRA knows its class (see
    PRUNABLE_STATE), else the one it wraps, followed through `.optim` (torch's ZeroRedundancyOptimizer, whose own
    `.state` stays empty) or `.optimizer` (accelerate's AcceleratedOptimizer, as the Trainer holds it).

    Raises TypeError naming the optimizer when neither it nor anything it wraps is a known class.
    """
    seen, current = [], optimizer
    while not isinstance(current, tuple(PRUNABLE_STATE)):
        seen.append(type(current).__name__)
        inner = getattr(current, "optim", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(current, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or len(seen) > 8:
            known = ", ".join(cls.__name__ for cls in PRUNABLE_STATE)
            raise TypeError(f"ReLoRA does not know the per-element state of {' -> '.join(seen)}, so it cannot prune "
                            f"it at a restart; use one of {known} (or a wrapper of one: ZeroRedundancyOptimizer, "
                            "an object with the optimizer in .optim or .optimizer)")
        current = inner
    return current


def _state_keys(holder: torch.optim.Optimizer) -> tuple[str, ...]:
    return next(keys for cls, keys in PRUNABLE_STATE.items() if isinstance(holder, cls))


def _per_element(state: dict, p: torch.Tensor, keys: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """The local shards of `state`'s per-element tensors. TypeError if it holds one under a key ReLoRA does not
    know (a subclass of a known optimizer with more state); ValueError if any holds a NaN or an infinity."""
    numel = local_tensor(p).numel()
    tensors = {}
    for key, value in state.items():
        if key == "step" or not isinstance(value, torch.Tensor):
            continue
        if key not in keys:
            if local_tensor(value).numel() == numel:
                raise TypeError(f"{what}: the optimizer state holds per-element {key!r}, which ReLoRA does not "
                                f"know how to prune (it prunes {', '.join(keys)})")
            continue
        tensors[key] = local_tensor(value)
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            # Pruning cannot make this state sound: a kept NaN poisons the new factors' first update, and the
            # factors being restarted have been updated from it already.
            raise ValueError(f"{what}: optimizer state {key!r} holds {int((~torch.isfinite(value)).sum())} NaN or "
                             "infinite values; the run has diverged before this restart")
    return tensors


def _update_size(tensors: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """|the update each element would take from its state|, up to a factor common to the whole tensor (the
    learning rate and Adam's bias corrections): |exp_avg| / (denominator + eps) for the Adam family and Adamax,
    |momentum_buffer| for SGD."""
    if "exp_avg" in tensors:
        if "exp_inf" in tensors:
            denominator = tensors["exp_inf"]
        else:  # amsgrad divides by the running maximum
            denominator = tensors.get("max_exp_avg_sq", tensors["exp_avg_sq"]).sqrt()
        return tensors["exp_avg"].abs() / (denominator + eps)
    return tensors["momentum_buffer"].abs()


def _keep_mask(tensors: dict[str, torch.Tensor], ratio: float, method: str, eps: float) -> torch.Tensor | None:
    """The flat boolean mask of the elements to keep (None: keep all)."""
    some = next(iter(tensors.values()))
    numel = some.numel()
    n_keep = _num_kept(ratio, numel)
    if n_keep >= numel and method != "zero":
        return None
    keep = torch.zeros(numel, dtype=torch.bool, device=some.device)
    if method == "zero" or n_keep == 0:
        return keep
    if method == "magnitude":
        # topk picks exactly n_keep indices even when several elements tie at the threshold; a `>= threshold`
        # compare would keep every tied element and so more than n_keep.
        score = _update_size(tensors, eps).flatten()
        keep.scatter_(0, torch.topk(score, n_keep, sorted=False).indices, True)
    else:
        # The default generator of the state's device, so torch.manual_seed reproduces the draw.
        keep.scatter_(0, torch.randperm(numel, device=some.device)[:n_keep], True)
    return keep


def prune_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    ratio: float = 0.99,
    method: str = "magnitude",
    names: Iterable[str] | None = None,
) -> int:
    """Prune, in place, the per-element optimizer state of `params` (Adam's `exp_avg` and `exp_avg_sq`, amsgrad's
    `max_exp_avg_sq`, Adamax's `exp_inf`, SGD's `momentum_buffer`: PRUNABLE_STATE); returns the number of state
    tensors pruned.

    Each parameter gets one mask, applied to all its state tensors, so an element keeps all of its state or none
    of it; all but `n_keep = round((1 - ratio) * numel)` of its elements are set to 0 (Python's round, halves to
    even; ratio=0 keeps everything, ratio=1 zeros everything).

        method="magnitude"  keeps the n_keep elements whose update would be largest: |exp_avg| / (sqrt(exp_avg_sq)
                            + eps) for Adam, AdamW, NAdam and RAdam (sqrt(max_exp_avg_sq) with amsgrad),
                            |exp_avg| / (exp_inf + eps) for Adamax, |momentum_buffer| for SGD; eps is the
                            parameter group's (1e-8 if it has none); ties at the threshold are broken by torch.topk,
                            never keeping more than n_keep. Kept values are unchanged.
        method="random"     keeps n_keep elements drawn uniformly without replacement from torch's default
                            generator on the state's device (torch.manual_seed reproduces it)
        method="zero"       zeros the state completely

    An element pruned this way restarts as a never-stepped one (Adam's next update there is about lr * sign(grad));
    a kept element's next update is the one it would have taken without pruning.

    The optimizer may wrap the one that holds the state (ZeroRedundancyOptimizer, accelerate's
    AcceleratedOptimizer): see state_holder. Under ZeroRedundancyOptimizer each rank prunes the state of the
    parameters it owns. Sharded state (DTensors, as FSDP2's parameters give Adam) is pruned within each shard: every
    rank ranks (or draws, or zeros) only the elements it holds, with n_keep from its local numel, so pruning needs
    no communication. Magnitude pruning therefore keeps each shard's largest elements rather than the whole
    tensor's, and "random" draws from each rank's own generator.

    Only the keys above are touched: `state["step"]` (and so Adam's bias correction), any scalar state, and the
    state of every parameter not in `params` stay exactly as they were. A parameter with no state yet (never
    stepped) is skipped; a parameter listed twice is pruned once. `names` (one per param) name them in errors.

    Raises, before anything is changed: ValueError if ratio is not a real number in [0, 1], if method is not one of
    PRUNE_METHODS, if a parameter is not in the optimizer's param_groups, or if its state holds a NaN or an
    infinity (the run has diverged; pruning would keep the value or hide it); TypeError for an optimizer ReLoRA
    does not know (see state_holder) or state it does not know how to prune.
    """
    ratio = check_fraction("ratio", ratio)
    check_choice("method", method, PRUNE_METHODS)
    return _prune_(_prunable_state(optimizer, params, names), ratio, method)


def _prunable_state(optimizer: torch.optim.Optimizer, params, names) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(the per-element state tensors, the group's eps) of each stepped parameter in `params`, checked (see
    prune_optimizer_state_) but not changed."""
    if isinstance(params, torch.Tensor):
        # list(tensor) would silently iterate over its rows.
        raise TypeError("params must be an iterable of tensors, not a single tensor; wrap it in a list")
    params = list(params)
    names = [f"params[{index}]" for index in range(len(params))] if names is None else list(names)
    if len(names) != len(params):
        raise ValueError(f"names has {len(names)} entries for {len(params)} params")
    holder = state_holder(optimizer)
    keys = _state_keys(holder)

    # Parameters are compared by identity, as the optimizer keys its state by the tensor object.
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    unique = {}
    for name, p in zip(names, params, strict=True):
        if id(p) not in group_of:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{name} ({shape}) is not in the optimizer's param_groups")
        unique.setdefault(id(p), (name, p))

    found = []
    for name, p in unique.values():
        # .get, not [], because optimizer.state is a defaultdict and [] would add an empty entry. Under
        # ZeroRedundancyOptimizer only the parameters this rank owns have state here.
        state = holder.state.get(p)
        if state:
            tensors = _per_element(state, p, keys, name)
            if tensors:
                found.append((tensors, group_of[id(p)].get("eps", 1e-8)))
    return found


def _prune_(found: list[tuple[dict[str, torch.Tensor], float]], ratio: float, method: str) -> int:
    pruned = 0
    with torch.no_grad():
        for tensors, eps in found:
            keep = _keep_mask(tensors, ratio, method, eps)
            for value in tensors.values():
                if keep is not None:
                    # masked_fill_ writes through any strides, so a non-contiguous state tensor is pruned in place
                    # too, and the local shard of a DTensor is a view of its storage.
                    value.masked_fill_(~keep.view(value.shape), 0)
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

    The re-warmup follows the envelope as it falls: it is the envelope scaled by j / restart_warmup_steps. The
    ReLoRA paper's code ramps instead on a straight line from 0 to the envelope's value at the end of the
    re-warmup, envelope(k * restart_every + restart_warmup_steps) * j / restart_warmup_steps, which is lower by
    (envelope(step) - envelope(end of re-warmup)) * j / restart_warmup_steps: never more than the envelope's fall
    over one re-warmup. The two agree everywhere else below max_steps. Past max_steps that code's cosine rises again;
    this envelope stays at min_lr_ratio.

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

    Call `step(step)` after optimizer step number `step` (1-based). When `step % restart_every == 0` (and, if
    `max_steps` is given, step < max_steps: a restart after the last step would change nothing the run uses) every
    LoRALinear in `model` (in `model.modules()` order) merges B @ A into its weight and re-draws A with the seed
    `restart_seed(seed, step // restart_every, layer_index)`, B becomes 0, and the optimizer state of all lora_A /
    lora_B parameters is pruned with `prune_optimizer_state_(ratio=prune_ratio, method=prune_method)`; it returns
    True. Otherwise it returns False and changes nothing. The learning-rate re-warmup belongs to the scheduler
    (`jagged_cosine` with the same `restart_every`).

    Checked at construction (ValueError or TypeError, nothing changed): the model has LoRALinear layers, the
    optimizer holds all their factors and is one whose state ReLoRA can prune (PRUNABLE_STATE, or a wrapper of one:
    ZeroRedundancyOptimizer, accelerate's), and no layer's weight or factors are shared with another module (tied
    weights: the merge writes into the weight in place, so it would change the other module's function too).
    Checked at every `step` (RuntimeError, nothing changed): the model's LoRALinear layers are still the ones it
    was built with — a layer added later would never restart. Checked at a restart before anything changes:
    the factors' optimizer state is finite (ValueError naming the parameter).

    Under FSDP2 (fully_shard) every rank calls `step` and each layer restarts shard-locally: A is all-gathered once,
    each rank merges its own rows of W (never gathered), keeps its rows of the new A and zeros its rows of B (see
    LoRALinear.merge_and_reinit); the optimizer state is pruned within each shard (see prune_optimizer_state_).

    Everything a restart does depends only on the step number and the constructor's arguments, so `state_dict()`
    carries just the count of restarts done (for logging) and the settings, which `load_state_dict` checks.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, restart_every: int,
                 prune_ratio: float = 0.99, prune_method: str = "magnitude", seed: int = 0,
                 max_steps: int | None = None):
        self.restart_every = check_int("restart_every", restart_every, 1)
        self.prune_ratio = check_fraction("prune_ratio", prune_ratio)
        self.prune_method = check_choice("prune_method", prune_method, PRUNE_METHODS)
        self.seed = check_int("seed", seed, 0)
        self.max_steps = None if max_steps is None else check_int("max_steps", max_steps, 1)
        self.model, self.optimizer = model, optimizer
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if not self.layers:
            raise ValueError("model has no LoRALinear layers: call apply_lora(model, ...) before ReLoRA(...)")
        names = {id(m): name for name, m in model.named_modules()}
        self._layer_names = [names[id(m)] for m in self.layers]
        # Checked here, not at the first restart: there prune_optimizer_state_ would raise after every layer merged.
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [names[id(m)] for m in self.layers if id(m.lora_A) not in in_optimizer or id(m.lora_B) not in
                   in_optimizer]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"the optimizer does not hold lora_A and lora_B of {shown}: build it after apply_lora, "
                             "over the model's trainable parameters")
        state_holder(optimizer)  # TypeError now, naming an optimizer whose state a restart could not prune
        _check_not_shared(model, self.layers, self._layer_names)
        self.restarts = 0

    def step(self, step: int) -> bool:
        step = check_int("step", step, 1)
        self._check_layers_unchanged()
        if step % self.restart_every != 0 or (self.max_steps is not None and step >= self.max_steps):
            return False
        restart = step // self.restart_every
        self._check_sharded()
        lora_params = [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]
        lora_names = [f"{name}.{factor}" for name in self._layer_names for factor in ("lora_A", "lora_B")]
        # The state is found and checked (finite, known keys) before any layer merges: a refusal leaves the model
        # as it was. The merge does not touch it.
        state = _prunable_state(self.optimizer, lora_params, lora_names)
        for index, layer in enumerate(self.layers):
            layer.merge_and_reinit(seed=restart_seed(self.seed, restart, index))
        _prune_(state, self.prune_ratio, self.prune_method)
        self.restarts += 1
        return True

    def _check_layers_unchanged(self) -> None:
        current = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        if len(current) == len(self.layers) and all(a is b for a, b in zip(current, self.layers, strict=True)):
            return
        known = {id(m) for m in self.layers}
        now = {id(m) for m in current}
        added = [name for name, m in self.model.named_modules() if isinstance(m, LoRALinear) and id(m) not in known]
        removed = [name for name, m in zip(self._layer_names, self.layers, strict=True) if id(m) not in now]
        details = "; ".join(part for part in (f"added: {', '.join(added[:4])}" if added else "",
                                              f"removed or replaced: {', '.join(removed[:4])}" if removed else "")
                            if part) or "reordered"
        raise RuntimeError(f"ReLoRA.step: the model's LoRALinear layers changed since ReLoRA(...) was built "
                           f"({details}); a layer it does not know would never restart. Build the optimizer and "
                           "ReLoRA again after changing the layers")

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


def _storage_key(t: torch.Tensor):
    # Two tensors that are views of one storage (a tied weight is often a second Parameter over the same memory)
    # share its data pointer. Meta tensors have no storage and DTensors are compared by identity only.
    if is_dtensor(t) or t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
        return ("id", id(t))
    return ("storage", t.device, t.untyped_storage().data_ptr())


def _check_not_shared(model: nn.Module, layers: list[LoRALinear], layer_names: list[str]) -> None:
    """ValueError if a LoRALinear's weight or factors share memory with a tensor of the model outside that layer."""
    owners: dict = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owners.setdefault(_storage_key(t), []).append(name)
    for layer_name, layer in zip(layer_names, layers, strict=True):
        prefix = f"{layer_name}." if layer_name else ""
        for attr in ("weight", "lora_A", "lora_B"):
            others = [name for name in owners.get(_storage_key(getattr(layer, attr)), [])
                      if name != prefix + attr]
            if others:
                raise ValueError(f"{prefix}{attr} shares its memory with {', '.join(others[:4])} (tied weights): a "
                                 f"restart merges into {prefix}weight in place, which would change "
                                 f"{others[0]} too. Leave that layer out of apply_lora, or untie it (give it its "
                                 "own copy of the weight)")
