"""Planted checkpoint files for the tests: pickles whose loading runs code (it writes a marker file), in the two
forms a checkpoint's readers could meet them (a bare pickle, as DCP's .metadata is; torch.save's zip, as state.pt and
DCP's byte items are), and a DCP byte item swapped for one."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def pickled(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_saved(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


PAYLOADS = {"pickle": pickled, "torch.save": torch_saved}


def plant_byte_item(ckpt: Path, marker: Path) -> str:
    """Point the first of DCP's byte items in `ckpt` at a torch.save payload appended to its shard file, as one who
    rewrote the checkpoint would; returns "<shard file>: byte item <name>". (Reads .metadata with pickle: the test's
    own file.)"""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    fqn = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == fqn)
    shard = ckpt / info.relative_path
    data, offset = torch_saved(marker), shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(data)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(data))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    return f"{info.relative_path}: byte item {fqn}"
