"""LoRALinear, the drop-in replacement for nn.Linear, and apply_lora / merge_lora for whole models.

    y = x @ W.T + bias + scale * dropout(x) @ A.T @ B.T      W frozen; A, B (and bias) trained
    scale = alpha / r   (alpha / sqrt(r) with use_rslora)    alpha defaults to r, so scale = 1

A fresh layer has B = 0, so it computes exactly what its frozen weight does; `merge_and_reinit` folds B @ A into W
and starts the factors over (a ReLoRA restart) without changing the function.

With frozen_dtype="fp8" the layer keeps, beside its master W (the Parameter state_dict saves), two FP8 (e4m3) copies
of W for the frozen GEMMs (functional.quantize_fp8_weight), as buffers that are never saved: derived data, rebuilt
from W whenever W changes (LoRALinear.refresh_frozen_weight says how a change is seen). Since the frozen GEMMs
read only the copies, the master can live in (pinned) CPU memory instead (master_device="cpu"): the GPU then holds
2 bytes per frozen parameter, as a bf16 layer does, and W crosses the bus only at a restart, a load or an export.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from . import reference
from ._validate import check_frozen_dtype, check_int, check_probability, is_dtensor
from .distributed import (
    full_tensor,
    gather_fp8_weight,
    local_tensor,
    merge_and_reinit_sharded_,
    quantize_fp8_weight_shard,
)
from .functional import draw_seed, lora_linear, lora_linear_fp8, merge_and_reinit_, quantize_fp8_weight

# The FP8 copies' buffer names: W by rows (the forward's operand) and W.T by rows (the input gradient's), each with
# its row scales; in the order of reference.FP8Weight's fields.
_FP8_BUFFERS = ("weight_fp8", "weight_fp8_scale", "weight_t_fp8", "weight_t_fp8_scale")


def _check_master_device(master_device, frozen_dtype) -> torch.device | None:
    if master_device is None:
        return None
    if not isinstance(master_device, (str, torch.device)) or torch.device(master_device) != torch.device("cpu"):
        raise ValueError(f"master_device must be None (the master W moves with the layer) or 'cpu', "
                         f"got {master_device!r}")
    if frozen_dtype != "fp8":
        raise ValueError(f"master_device='cpu' needs frozen_dtype='fp8' (got frozen_dtype={frozen_dtype!r}): only "
                         "the FP8 copies let the frozen GEMMs run without W on the compute device")
    return torch.device("cpu")


def _can_pin() -> bool:
    # pin_memory raises on a machine without an accelerator (there is nothing to pin for).
    return torch.accelerator.is_available()


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D: a linear layer that stores its weight as (in, out) and computes x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoRALinear(nn.Module):
    """nn.Linear with a frozen weight and a trainable low-rank update computed by the fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        r: rank of the update (>= 1). alpha: scale numerator (default r). use_rslora: scale = alpha / sqrt(r).
        dropout: dropout probability on the LoRA branch's input, active in training mode only.
        frozen_dtype: None (the frozen GEMMs in W's dtype) or "fp8": both frozen GEMMs (x @ W.T and dy @ W) on FP8
            (e4m3) copies of W, rowwise-scaled, x and dy quantised per token (functional.lora_linear_fp8). Costs 2
            bytes per frozen parameter beside the master W (1 per copy, plus a scale per row).
        master_device: None (the master W moves with the layer) or "cpu" (frozen_dtype="fp8" only, else ValueError):
            W stays in CPU memory through .to() / .cuda() and every other _apply (which still convert its dtype),
            while the factors, the bias and the FP8 copies move. Pinned once the copies are on an accelerator, so
            the copies to and fro are DMA (the one up asynchronous); not pinned on a machine without an accelerator
            (pin_memory raises there) nor before the layer first goes to one. A W assigned from another device
            (layer.weight = ..., load_state_dict(assign=True), from_linear of a GPU module) is moved there, its
            Parameter kept. Built on the meta device, the layer still allocates its master in CPU memory,
            uninitialised (as to_empty would). The GPU then holds 2 bytes per frozen parameter instead of 2 + W's
            size; the price is W's trip to the GPU at each refresh of the copies and there and back at each restart
            (merge_and_reinit). `to_linear`, `to_base` and `merge_lora` build the merged layer on the compute device
            (the factors' device), as the same layer without the option does: move the model to the CPU first to
            merge without the GPU memory.

    Parameters: `weight` (out, in), frozen; `bias` (out,) trainable, or None; `lora_A` (r, in), kaiming-uniform
    with a = sqrt(5) as nn.Linear and PEFT initialise it; `lora_B` (out, r), zero. With frozen_dtype="fp8", the
    non-persistent buffers `weight_fp8` (out, in), `weight_fp8_scale` (out,), `weight_t_fp8` (in, out) and
    `weight_t_fp8_scale` (in,).
    """

    def __init__(self, in_features, out_features, r, alpha=None, dropout=0.0, bias=True, use_rslora=False,
                 device=None, dtype=None, frozen_dtype=None, master_device=None):
        super().__init__()
        frozen_dtype = check_frozen_dtype(frozen_dtype)
        _check_master_device(master_device, frozen_dtype)
        self.frozen_dtype = self.master_device = None  # set by _set_frozen_dtype once the weight exists
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            check_int(name, value, 1)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.set_scaling(alpha, dropout, use_rslora)
        self.fan_in_fan_out = False  # True when made from a GPT-2 Conv1D ((in, out) weight); PEFT's config records it
        self._conv1d_type = None  # that Conv1D class, so that merge_lora gives the model back its own module type

        # Base layer initialised exactly as nn.Linear would, then frozen.
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach()) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # W is drawn on `device` as nn.Linear draws it (the same seed, the same W with or without master_device),
        # then moved.
        self._set_frozen_dtype(frozen_dtype, master_device)

    # ------------------------------------------------------------------------------------------------------------
    # The FP8 copies of W. A stale copy would silently compute with an old W, so every way W changes re-quantises:
    #   a new Parameter (layer.weight = ..., load_state_dict(assign=True))   __setattr__, at once
    #   .to() / .cuda() / .half() and every other _apply                     _apply, at once
    #   load_state_dict                                                      _load_from_state_dict, at once
    #   merge_and_reinit (its Triton kernel writes W with no version bump)   merge_and_reinit, at once
    #   in-place writes to the Parameter (weight.copy_/add_, optimizers)     its version counter, next eager forward
    #   layer.weight.data = new                                              the data's address, next eager forward
    # What no stamp can see: writes through a tensor that shares W's memory but not its version counter
    # (weight.data.add_(...), a kernel of one's own). Call refresh_frozen_weight() after those.
    # With master_device="cpu" the same paths refresh through the same calls: each one quantises a copy of W made on
    # the compute device (_quantize_from), and the restart writes its merged W back to the master before the stamp
    # is taken (so the stamp records the master's version after the write). A W found off the master device by any
    # of them (a Parameter put in _parameters directly, weight.data = a GPU tensor) is moved back first
    # (_place_master).
    # ------------------------------------------------------------------------------------------------------------

    def _set_frozen_dtype(self, frozen_dtype, master_device=None) -> None:
        self.frozen_dtype = check_frozen_dtype(frozen_dtype)
        self.master_device = _check_master_device(master_device, self.frozen_dtype)
        self._fp8_stamp = None  # (W the Parameter, an alias of its data, its version) when the copies were made
        self._fp8_sharded = False  # W sharded by fsdp_shard_fp8_weights: the copies hold this rank's rows
        if frozen_dtype == "fp8":
            for name in _FP8_BUFFERS:
                self.register_buffer(name, None, persistent=False)  # derived from W: never saved
            self.refresh_frozen_weight()

    def _compute_device(self) -> torch.device:
        """Where the layer computes: its factors' device (W's too, unless master_device keeps W elsewhere)."""
        return self.lora_A.device

    @torch.no_grad()
    def _place_master(self, dtype: torch.dtype | None = None) -> None:
        """Put W's data on the master device (pinned while the copies are on an accelerator), in `dtype` if given;
        the Parameter object is kept (optimizers and user references hold it). Nothing moves if it is there."""
        weight = self.weight
        if self.master_device is None or is_dtensor(weight):
            return  # a DTensor master is refused by refresh_frozen_weight, by name
        dtype = weight.dtype if dtype is None else dtype
        pinned = self._compute_device().type not in ("cpu", "meta") and _can_pin()
        if (weight.device == self.master_device and weight.dtype == dtype
                and (not pinned or weight.is_pinned())):
            return
        if weight.is_meta:  # built on the meta device (W has no values yet): uninitialised, as to_empty makes it
            data = torch.empty_like(weight, dtype=dtype, device=self.master_device)
        else:
            data = weight.detach().to(self.master_device, dtype)
        data = data.pin_memory() if pinned else data
        if torch._has_compatible_shallow_copy_type(weight, data):
            weight.data = data
        else:  # meta -> CPU: no .data swap between them (as in Module._apply), so a new Parameter
            self._parameters["weight"] = nn.Parameter(data, requires_grad=weight.requires_grad)

    @torch.no_grad()
    def refresh_frozen_weight(self) -> None:
        """Re-quantise the FP8 copies from W now (frozen_dtype="fp8"; nothing otherwise). The layer does it itself
        whenever W changes through the module or the Parameter (see the table above _set_frozen_dtype); call it
        after writing W's memory by other means (weight.data.add_(...)), and before a torch.compile'd forward after
        any in-place write to W: compiled graphs do not check the copies' freshness (only eager forwards do).
        With master_device="cpu" it quantises a copy of W made on the compute device (W's trip over the bus)."""
        if self.frozen_dtype != "fp8":
            return
        if is_dtensor(self.weight):
            if not self._fp8_sharded:
                raise TypeError("an FSDP2-sharded W (a DTensor) of a frozen_dtype='fp8' layer must be sharded by "
                                "rk.fsdp_shard_fp8_weights(model), whose result fully_shard takes as ignored_params: "
                                "FSDP2 would otherwise all-gather W in its own dtype at every step")
            # A collective (the column maxima's all-reduce): every rank refreshes when every rank's W changes.
            self._store_copies(quantize_fp8_weight_shard(self.weight))
            return
        if self.master_device is None:
            self._quantize_from(self.weight.detach())
            return
        self._place_master()
        self._quantize_from(self._master_on_compute_device())

    def _master_on_compute_device(self) -> torch.Tensor:
        # Always a copy, even when the layer computes on the CPU too: the CPU runs the path an accelerator takes, and
        # the restart may write into it without touching the master. From pinned memory the copy is asynchronous;
        # the work that reads it is queued after it on the same stream.
        return self.weight.detach().to(self._compute_device(), copy=True, non_blocking=True)

    def _quantize_from(self, weight: torch.Tensor) -> None:
        """Make the FP8 copies from `weight` (W itself, or its copy on the compute device) and stamp the master W
        as it is now."""
        self._store_copies(quantize_fp8_weight(weight))

    def _store_copies(self, copies: reference.FP8Weight) -> None:
        for name, new in zip(_FP8_BUFFERS, copies, strict=True):
            old = self._buffers[name]
            if old is not None and (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device):
                old.copy_(new)  # in place: a captured graph (CUDA graphs) keeps reading the same memory
            else:
                self._buffers[name] = new
        # The alias keeps the quantised data's memory alive, so a later tensor cannot take its address and pass for it.
        # A sharded W is stamped by its local rows, which in-place writes to the DTensor reach.
        master = self.weight
        data = local_tensor(master).detach()
        self._fp8_stamp = (master, data, data._version)

    def _fp8_copies_stale(self) -> bool:
        if self._fp8_stamp is None:
            return True
        weight = self.weight
        source, data, version = self._fp8_stamp
        local = local_tensor(weight)
        return (weight is not source or local._version != version or local.device != data.device
                or local.data_ptr() != data.data_ptr() or local.dtype != data.dtype
                or local.shape != data.shape or local.stride() != data.stride())

    def frozen_weight_fp8(self) -> reference.FP8Weight:
        """The FP8 copies as the functional op takes them (frozen_dtype="fp8"), refreshed first if W has changed.
        Of a layer sharded by fsdp_shard_fp8_weights: gathered whole (a collective)."""
        copies = self._fp8_local_copies()
        return gather_fp8_weight(copies, self.weight) if self._fp8_sharded else copies

    def _fp8_local_copies(self) -> reference.FP8Weight:
        """The copies this process holds (of its rows, when sharded), refreshed first if W has changed."""
        if self.frozen_dtype != "fp8":
            raise ValueError("this layer keeps no FP8 copies (frozen_dtype=None); LoRALinear(..., frozen_dtype='fp8')")
        # The stamp check reads Python state and W's version counter, which torch.compile cannot trace; compiled
        # graphs take the copies as they are (refreshed eagerly by every module-level path above).
        if self._fp8_sharded and not is_dtensor(self.weight):
            raise RuntimeError("this frozen_dtype='fp8' layer's W was sharded by fsdp_shard_fp8_weights but is whole "
                               "now: fully_shard gathered it, so it was not given that function's result as "
                               "ignored_params")
        if not torch.compiler.is_compiling() and self._fp8_copies_stale():
            self.refresh_frozen_weight()
        return reference.FP8Weight(*(self._buffers[name] for name in _FP8_BUFFERS))

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "weight" and self.__dict__.get("frozen_dtype") == "fp8":
            self.refresh_frozen_weight()  # moves a master from elsewhere to master_device first

    def _apply(self, fn, recurse=True):
        if self.__dict__.get("master_device") is None:
            result = super()._apply(fn, recurse)
        else:
            # W sits the conversion out (None is what Module._apply skips; the key keeps its place in the state dict
            # order), then takes the dtype fn gives a tensor of its dtype, on the master device.
            master = self._parameters["weight"]
            self._parameters["weight"] = None
            try:
                result = super()._apply(fn, recurse)
            finally:
                self._parameters["weight"] = master
            with torch.no_grad():
                dtype = fn(torch.empty(0, dtype=master.dtype)).dtype
            self._place_master(dtype)
        self.refresh_frozen_weight()  # W may have moved or changed dtype (and fn converted the copies too)
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_frozen_weight()

    def set_scaling(self, alpha=None, dropout=0.0, use_rslora=False) -> None:
        """Set alpha (None: r), dropout and use_rslora, and so the scale; the factors are left as they are."""
        check_probability("dropout", dropout)
        alpha = self.r if alpha is None else alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number or None, got {alpha!r}")
        self.alpha, self.use_rslora, self.dropout = alpha, use_rslora, float(dropout)
        self.scale = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r

    @classmethod
    def from_linear(cls, module, r, alpha=None, dropout=0.0, use_rslora=False, frozen_dtype=None,
                    master_device=None) -> LoRALinear:
        """Wrap an nn.Linear (its weight storage is shared, not copied, unless master_device moves it) or a GPT-2
        Conv1D (its (in, out) weight is transposed into a new tensor). The result computes the same function until
        the factors are trained (with frozen_dtype="fp8", up to the FP8 rounding of the frozen GEMMs)."""
        frozen_dtype = check_frozen_dtype(frozen_dtype)
        _check_master_device(master_device, frozen_dtype)
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
        elif _is_conv1d(module):
            weight = module.weight.detach().T.contiguous()
        else:
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, r, alpha, dropout, bias=module.bias is not None,
                    use_rslora=use_rslora, device=weight.device, dtype=weight.dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.fan_in_fan_out = _is_conv1d(module)
        layer._conv1d_type = type(module) if _is_conv1d(module) else None
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
        layer._set_frozen_dtype(frozen_dtype, master_device)  # once the module's weight is in place: quantised once
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if self.frozen_dtype == "fp8":
            if self._fp8_sharded and not torch.compiler.is_compiling():
                return self._sharded_fp8_forward(x, dropout_p)
            return lora_linear_fp8(x, self.frozen_weight_fp8(), self.lora_A, self.lora_B, self.scale, self.bias,
                                   dropout_p)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, self.bias, dropout_p)

    def _sharded_fp8_forward(self, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """The forward of a layer sharded by fsdp_shard_fp8_weights: each pass gathers the one copy it reads, just
        before it runs, and frees it after, as FSDP2 gathers an unsharded W (1 byte per element of W crosses the
        mesh in each pass, half of what gathering a bf16 W twice costs). The forward GEMM reads W by rows: gathered
        now. The input gradient's reads W.T: the op is given a tensor of its shape whose memory is allocated and
        gathered by a hook on the output's grad_fn when the backward reaches this layer (autograd saves the tensor,
        not its memory). Only where no gradient will flow is nothing left for a backward to gather."""
        local = self._fp8_local_copies()
        n, k = self.weight.shape
        forward_copy = gather_fp8_weight(local, self.weight, transposed=False)
        transposed = torch.empty((k, n), dtype=local.q_t.dtype, device=local.q_t.device)
        transposed.untyped_storage().resize_(0)  # no memory until the backward needs it
        copies = forward_copy._replace(q_t=transposed)
        y = lora_linear_fp8(x, copies, self.lora_A, self.lora_B, self.scale, self.bias, dropout_p)
        # The forward's kernels are queued; on an accelerator the memory goes back to the allocator in stream order.
        forward_copy.q.untyped_storage().resize_(0)
        if y.grad_fn is not None:
            nbytes = k * n * transposed.element_size()

            def gather_transposed(grad_outputs):
                whole = gather_fp8_weight(self._fp8_local_copies(), self.weight, rows=False)
                transposed.untyped_storage().resize_(nbytes)
                # Filling the tensor autograd saved, before it reads it: not a write its version check should refuse.
                with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(transposed):
                    transposed.copy_(whole.q_t)

            y.grad_fn.register_prehook(gather_transposed)
        return y

    def _is_sharded(self) -> bool:
        return any(map(is_dtensor, (self.weight, self.lora_A, self.lora_B)))

    @torch.no_grad()
    def merge_and_reinit(self, seed: int | None = None) -> None:
        """W += scale * B @ A, then A re-drawn from `seed` (None: from torch's default generator) and B = 0.

        Under FSDP2 (fully_shard; the parameters are DTensors between steps) each rank merges its own rows of W
        and only A is all-gathered (distributed.merge_and_reinit_sharded_): every rank must call it, and with an
        explicit seed, since ranks' default generators need not agree.
        """
        if self._is_sharded():
            if seed is None:
                raise ValueError("seed must be given for an FSDP2-sharded layer: every rank must draw the same A")
            merge_and_reinit_sharded_(self.weight, self.lora_A, self.lora_B, self.scale, seed=seed)
            self.refresh_frozen_weight()  # its rows of W changed (a collective with frozen_dtype="fp8", as the merge)
            return
        seed = draw_seed() if seed is None else seed
        if self.master_device is None:
            merge_and_reinit_(self.weight, self.lora_A, self.lora_B, self.scale, seed=seed)
            self.refresh_frozen_weight()  # W changed (the merge kernel writes it without bumping its version)
            return
        # The master off the compute device: merge into a copy of W there with the same kernel, write the merged W
        # back, and quantise the copies from the device's copy (the bits the master now holds).
        self._place_master()
        weight = self._master_on_compute_device()
        merge_and_reinit_(weight, self.lora_A, self.lora_B, self.scale, seed=seed)
        # A blocking copy: it returns once the bytes are in the master. A non_blocking copy into pinned memory would
        # return at once, and a host reader of W (state_dict, torch.save, to_linear on the CPU) follows no stream, so
        # it could read a half-written master.
        self.weight.copy_(weight, non_blocking=False)
        self._quantize_from(weight)  # the stamp after the write: it records the master's version as written

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight W + scale * B @ A (this layer is left unchanged).

        Under FSDP2 the parameters are all-gathered first (a collective: every rank must call it), so every rank
        gets the full merged layer as plain tensors.
        """
        weight, lora_a, lora_b, bias = map(full_tensor, (self.weight, self.lora_A, self.lora_B, self.bias))
        weight = weight.to(lora_a.device)  # a master kept on the CPU: merged on the compute device (see the class)
        with torch.device("meta"):  # no random init (nor RNG draw) for a weight that is replaced at once
            linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        linear.weight = nn.Parameter(reference.merged_weight(weight, lora_a, lora_b, self.scale))
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone())
        return linear

    @torch.no_grad()
    def to_base(self) -> nn.Module:
        """The merged layer as the module type it was made from: a Conv1D (holding the merged weight as (in, out))
        for a layer made from one, else the nn.Linear of `to_linear`. This layer is left unchanged."""
        linear = self.to_linear()
        if self._conv1d_type is None:
            return linear
        with torch.device("meta"):
            conv = self._conv1d_type(self.out_features, self.in_features)  # Conv1D(nf=out, nx=in)
        conv.weight = nn.Parameter(linear.weight.T.contiguous())
        conv.bias = linear.bias if linear.bias is not None else nn.Parameter(linear.weight.new_zeros(self.out_features))
        return conv

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scale={self.scale:g}{', rslora' if self.use_rslora else ''}, "
                f"dropout={self.dropout:g}, bias={self.bias is not None}"
                f"{', frozen_dtype=fp8' if self.frozen_dtype == 'fp8' else ''}"
                f"{f', master_device={self.master_device.type}' if self.master_device is not None else ''}")


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, target_modules, r, alpha=None, dropout=0.0, use_rslora=False, *,
               train_others: bool = True, frozen_dtype=None, master_device=None) -> nn.Module:
    """Replace the matching nn.Linear / Conv1D modules of `model` by LoRALinear layers, in place; returns `model`.

    target_modules: a str is a regular expression matched in full against each module's qualified name
    ("h.0.attn.c_attn"); a list or tuple matches exact names or name suffixes at a dot ("c_attn" matches
    "h.0.attn.c_attn"), as PEFT does. Matched base weights are frozen. Raises ValueError if nothing matches.

    train_others: what happens to every parameter that is not a LoRA factor (lora_A, lora_B).
      True (default): left as it was, so embeddings, norms, biases and the head keep training. ReLoRA pre-trains
        a model from scratch: there the parameters outside the replaced linears are trained full-rank, as the
        official ReLoRA code does, and freezing them would leave them at their random initialisation.
      False: frozen, the LoRALinear layers' biases included, so only the factors train: PEFT's LoraConfig with
        its defaults (bias="none", no modules_to_save), the usual choice for fine-tuning a pre-trained model.
        Unfreeze what else should train (e.g. a new head) by setting its requires_grad afterwards.
    frozen_dtype: None or "fp8", as LoRALinear's (FP8 copies of each replaced layer's frozen weight).
    master_device: None or "cpu" (with frozen_dtype="fp8"), as LoRALinear's (each master W kept in CPU memory).
    """
    if not isinstance(target_modules, (str, list, tuple)) or not target_modules:
        raise TypeError(f"target_modules must be a regex str or a non-empty list of names, got {target_modules!r}")
    if not isinstance(train_others, bool):
        raise TypeError(f"train_others must be True or False, got {train_others!r}")
    frozen_dtype = check_frozen_dtype(frozen_dtype)
    _check_master_device(master_device, frozen_dtype)
    matched = [name for name, module in model.named_modules()
               if name and _is_linear_like(module) and _matches(name, target_modules)]
    if not matched:
        linear_names = [name for name, module in model.named_modules() if name and _is_linear_like(module)]
        shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear/Conv1D module; "
                         f"the model's linear modules are: {shown or 'none'}")
    for name in matched:
        layer = LoRALinear.from_linear(model.get_submodule(name), r, alpha, dropout, use_rslora, frozen_dtype,
                                       master_device)
        _replace(model, name, layer)
    if not train_others:
        factors = {id(p) for module in model.modules() if isinstance(module, LoRALinear)
                   for p in (module.lora_A, module.lora_B)}
        for p in model.parameters():
            if id(p) not in factors:
                p.requires_grad_(False)
    if frozen_dtype == "fp8":
        ddp_skip_fp8_copies(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by a layer holding its merged weight, in place; returns `model`.

    The layer is of the type the LoRALinear was made from: a GPT-2 Conv1D again for one made from a Conv1D (so the
    model's own save_pretrained / from_pretrained round-trip), else a plain nn.Linear. Raises TypeError on an
    FSDP2-sharded model, whose parameter groups would still hold the replaced layers'; there, `layer.to_linear()`
    gives each merged layer in full, or merge an unsharded copy of the model.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    sharded = [name for name in names if model.get_submodule(name)._is_sharded()]
    if sharded:
        raise TypeError(f"merge_lora cannot replace layers of an FSDP2-sharded model ({sharded[0]} holds DTensors): "
                        f"call layer.to_linear() on each LoRALinear (full tensors on every rank), or load the full "
                        f"state dict into an unsharded model and merge_lora that")
    for name in names:
        _replace(model, name, model.get_submodule(name).to_base())
    return model


# DistributedDataParallel reads this attribute of the module it wraps: the parameters and buffers (qualified names)
# it neither broadcasts at construction nor, with broadcast_buffers, before each forward.
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def fsdp_shard_fp8_weights(model: nn.Module, mesh=None) -> set[nn.Parameter]:
    """Shard the frozen W of every frozen_dtype="fp8" LoRALinear of `model` by rows for FSDP2, and return those
    Parameters: give them to every fully_shard call as `ignored_params`, so that FSDP2 leaves them sharded.

    Each W becomes a DTensor sharded Shard(0) over `mesh` (default: a 1-D mesh of the whole world on W's device
    type, FSDP2's default, so W's rows split as lora_B's), scattered from rank 0; each rank keeps the FP8 copies of
    its own rows (distributed.quantize_fp8_weight_shard) and a forward all-gathers the copies, 1 byte per element
    for each of the two, where FSDP2 would gather W in its dtype. A ReLoRA restart merges each rank's rows and
    re-quantises them; state_dict holds W as the DTensor (torch.distributed.checkpoint saves it sharded). A
    collective: call it on every rank, before fully_shard, with the process group initialised. The gathered copies
    of a layer live from its forward to its backward (FSDP2 would free and re-gather an unsharded W).

    Raises ValueError for a layer with master_device="cpu" (the master is then one whole W in CPU memory), TypeError
    for a W that is already a DTensor (sharded by FSDP2: shard before fully_shard).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, LoRALinear) and module.frozen_dtype == "fp8"]
    for name, layer in layers:
        if layer.master_device is not None:
            raise ValueError(f"{name}: fsdp_shard_fp8_weights takes no layer with master_device='cpu'")
        if is_dtensor(layer.weight) and not layer._fp8_sharded:
            raise TypeError(f"{name}: W is already a DTensor (fully_shard was called before "
                            f"fsdp_shard_fp8_weights, which must come first)")
    if layers and not dist.is_initialized():
        raise RuntimeError("fsdp_shard_fp8_weights needs torch.distributed's process group (init_process_group)")
    sharded = set()
    for _, layer in layers:
        if not layer._fp8_sharded:
            weight = layer.weight
            layer_mesh = mesh if mesh is not None else init_device_mesh(weight.device.type, (dist.get_world_size(),))
            layer._fp8_sharded = True
            layer.weight = nn.Parameter(distribute_tensor(weight.detach(), layer_mesh, [Shard(0)]),
                                        requires_grad=False)  # __setattr__ quantises this rank's rows
        sharded.add(layer.weight)
    return sharded


def ddp_skip_fp8_copies(model: nn.Module) -> nn.Module:
    """Keep DistributedDataParallel from broadcasting the FP8 copies of `model`'s LoRALinear layers; returns `model`.

    The copies are derived data: each rank quantises them from its W, which DDP does broadcast from rank 0 when it
    wraps the model (an in-place write that bumps W's version, so each layer re-quantises at its next forward).
    Broadcasting them too would move 2 bytes per frozen parameter for nothing, and gloo has no float8 type at all
    ("Invalid scalar type"). apply_lora(frozen_dtype="fp8") calls this on the model it returns; call it on the
    module you wrap when that is another one (a parent of that model, or one built from LoRALinear layers).
    """
    names = [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             if isinstance(module, LoRALinear) and module.frozen_dtype == "fp8" for name in _FP8_BUFFERS]
    ignored = list(getattr(model, _DDP_IGNORE, ()))
    setattr(model, _DDP_IGNORE, ignored + [name for name in names if name not in ignored])
    return model
