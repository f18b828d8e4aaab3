"""The --fsdp path of pretrain_gpt2.py: FSDP2 wrapping, the switch to LoRA on a sharded model, sharded checkpoints.

Wrapping: every transformer block is one fully_shard unit and the root (embeddings, final LayerNorm, tied head) is
another, so a rank holds 1/world of every parameter, gradient and Adam moment, and one block's weights are gathered
at a time. On GPU the blocks compute in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy); the sharded
parameters and Adam state stay fp32.

Checkpoints (torch.distributed.checkpoint, DCP): ckpt/step_XXXXXXXX/ holds DCP's files (.metadata and one
__R_0.distcp per rank: its shards of the model and optimizer state), state.pt (rank 0: the step, config, ReLoRA
counter, RNG state, data manifest) and DONE. Every rank writes into one temporary folder; after a barrier rank 0
renames it into place and writes DONE, so a kill at any point leaves either the previous checkpoint or a folder
without DONE, which does not count. A write that fails on any rank (a full disk) fails on every rank, after rank 0
removed what was written. DCP reshards on load, so a checkpoint resumes at another world size. Assumes one file
system seen by every rank (one machine, or a shared file system).

Reading runs no code from the files: DCP's .metadata is a pickle, read here by an unpickler that admits only DCP's
own metadata classes (and torch.Size, the dtypes, ...); its byte items (the optimizer's param_groups) are read with
torch.load(weights_only=True) where DCP would use weights_only=False; its tensors DCP reads with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from checkpoints import (
    UnreadableCheckpoint,
    checkpoint_failure,
    first_line,
    mark_done,
    root_cause,
    save_state,
    tensor_bytes,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import relora_kernels as rk
from relora_kernels.utils import publish

_MESH = {}


def mesh_for(device: torch.device):
    """One 1-D mesh over all ranks per device type, shared by every wrap (the Adam state carried over the switch to
    LoRA stays on the mesh of the new parameters)."""
    if device.type not in _MESH:
        _MESH[device.type] = init_device_mesh(device.type, (dist.get_world_size(),))
    return _MESH[device.type]


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard every block of model.h, then the root; moves this rank's shards to `device`. The frozen weights of
    FP8 LoRA layers (--fp8) are sharded by rows first and left out of FSDP2's gathers: each rank keeps the FP8
    copies of its rows, and the layers gather those (rk.fsdp_shard_fp8_weights)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    mesh = mesh_for(device)
    fp8_weights = rk.fsdp_shard_fp8_weights(model, mesh)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=fp8_weights)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=fp8_weights)
    return model


def full_state_on_cpu(model: torch.nn.Module) -> dict:
    """Every entry of model.state_dict() whole, on the CPU: gathered one tensor at a time (a collective), so the
    device never holds more than one unsharded tensor beyond the shards."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in model.state_dict().items()}


def local_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's shards are finite (a collective)."""
    ok = torch.tensor(int(all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                              for p in model.parameters())))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def plain(t):
    """A DTensor's value as a plain tensor (e.g. the replicated gradient norm); t otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save(root: Path, step: int, model, optimizer, state: dict | None) -> Path:
    """Write ckpt step `step` under root (= out_dir/ckpt) from every rank; `state` is rank 0's state.pt (None on the
    others). Returns the final folder. When a write fails on any rank (a full disk), rank 0 removes what was
    written and every rank raises the same RunError; the earlier checkpoints are untouched."""
    rank = dist.get_rank()
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}-sharded"
    model_state, optim_state = get_state_dict(model, optimizer)

    def on_rank_0(action):
        return action() if rank == 0 else None

    def make_tmp():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_shards():  # DCP gathers every rank's write results; sync_files fsyncs them
        writer = dcp.FileSystemWriter(tmp)
        writer.fs = _KeepingWriteErrors()
        try:
            dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        except CheckpointException as e:
            if writer.fs.errors:  # this rank's own failed write, which DCP's gather of results loses
                raise writer.fs.errors[0] from e
            raise
        on_rank_0(lambda: save_state(state, tmp / "state.pt"))

    def publish_and_mark():  # every rank's shards are on disk (the gather in _on_every_rank): now it counts
        if final.exists():
            shutil.rmtree(final)
        publish(tmp, final)
        mark_done(final, step=step, world=dist.get_world_size())

    try:
        for action in (lambda: on_rank_0(make_tmp), write_shards, lambda: on_rank_0(publish_and_mark)):
            _on_every_rank(action)
    except _WriteFailed as failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "DONE").exists():
                shutil.rmtree(final, ignore_errors=True)
        needed = tensor_bytes(model_state) + tensor_bytes(optim_state)  # the shards; state.pt is small
        raise checkpoint_failure(step, final, failed.cause, needed) from None
    return final


class _KeepingWriteErrors(FileSystem):
    """DCP's file system, keeping the OSError of a failed write: torch.save turns it into a RuntimeError ("unexpected
    pos") whose context, the OSError, does not survive DCP's gather of the ranks' results."""

    def __init__(self):
        super().__init__()
        self.errors: list[OSError] = []

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _ErrorKeepingStream(stream, self.errors)


class _ErrorKeepingStream:
    def __init__(self, stream, errors: list):
        self._stream, self._errors = stream, errors

    def write(self, data):
        try:
            return self._stream.write(data)
        except OSError as e:
            self._errors.append(e)
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _WriteFailed(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _on_every_rank(action) -> None:
    """Run this rank's part of a write, then agree (a collective, so also a barrier): if it failed on any rank,
    raise _WriteFailed on every rank with the first failure (its OSError where one is found: DCP wraps them)."""
    failure = None
    try:
        action()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- CheckpointException is a BaseException
        failure = root_cause(e)
    failures = [None] * dist.get_world_size()
    if failure is not None:  # what travels: (type, errno, text); the exception itself may not pickle
        is_os = isinstance(failure, OSError) and failure.errno is not None
        failure = (type(failure).__name__, failure.errno if is_os else None,
                   failure.strerror if is_os and failure.strerror else first_line(failure))
    dist.all_gather_object(failures, failure)
    first = next((f for f in failures if f is not None and f[1] is not None), None) or \
        next((f for f in failures if f is not None), None)  # an OSError's errno and text first
    if first is not None:
        name, code, text = first
        raise _WriteFailed(OSError(code, text) if code is not None else RuntimeError(f"{name}: {text}"))


# --- reading: nothing in a checkpoint folder runs code -----------------------------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's .metadata is made of; anything else (os.system, a module's function, ...) is
    refused before it is even looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata classes")


def read_metadata(ckpt: Path) -> Metadata:
    """DCP's index of a sharded checkpoint, read without running code; raises UnreadableCheckpoint unless it is
    one, and every shard file it names is a plain file name in `ckpt`."""
    try:
        with open(ckpt / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- parsing untrusted bytes can raise any type: each means "unreadable"
        raise UnreadableCheckpoint(f".metadata: {first_line(e)}") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or \
            not isinstance(storage, dict):
        raise UnreadableCheckpoint(".metadata does not hold DCP's index of a checkpoint")
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and
                isinstance(info.relative_path, str) and Path(info.relative_path).name == info.relative_path and
                info.relative_path not in ("", ".", "..") and isinstance(info.offset, int) and
                isinstance(info.length, int) and info.offset >= 0 and info.length >= 0 and
                not getattr(info, "transform_descriptors", None)):
            raise UnreadableCheckpoint(f".metadata: the entry of {getattr(index, 'fqn', index)!r} is not a shard "
                                       "of a file in the checkpoint's folder")
    return metadata


def _load_byte_item(data: bytes, where: str):
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 -- parsing untrusted bytes can raise any type: each means "unreadable"
        raise UnreadableCheckpoint(f"{where}: {first_line(e)}") from None


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with .metadata read by read_metadata (no code runs)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with its byte items (the optimizer's param_groups) read with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        safe = _load_byte_item(value.read(), f"byte item {read_item.dest_index.fqn}")
        again = io.BytesIO()
        torch.save(safe, again)  # our own serialisation of plain values: what DCP's loader then reads back
        again.seek(0)
        super().load_bytes(read_item, again)


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / ".metadata").exists()


def check(ckpt: Path) -> None:
    """Raise OSError or UnreadableCheckpoint unless DCP's index reads (no code runs), every shard file it names
    holds the bytes it points to (a kill or a full disk can truncate one rank's file) and every byte item loads
    with weights_only=True; reads no tensor."""
    metadata = read_metadata(ckpt)
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        path = ckpt / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            raise OSError(f"shard file {info.relative_path} is missing or truncated")
        if index.fqn in byte_items:
            with open(path, "rb") as f:
                f.seek(info.offset)
                _load_byte_item(f.read(info.length), f"{info.relative_path}: byte item {index.fqn}")


def load(ckpt: Path, model, optimizer) -> None:
    """Load a sharded checkpoint into the sharded model and its optimizer, resharding to this world size."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=SafeReader(ckpt), planner=SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
