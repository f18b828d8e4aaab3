"""The example's checkpoints as untrusted or damaged data: planted payloads never run, and a checkpoint whose files
do not parse (planted, bit-flipped) is skipped for the previous good one. In-process, on tiny models: the same
readers a --resume runs (checkpoints.newest_loadable_checkpoint, fsdp.check and fsdp.load), the plain layout and
DCP's (the --fsdp one; DCP writes the same files from one process as from each rank)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import checkpoints  # examples/ and tests/ are on sys.path (conftest.py)
import fsdp as sharded
import pytest
import torch
import torch.distributed.checkpoint as dcp
from model import GPT, LORA_TARGETS, GPTConfig
from payloads import PAYLOADS, plant_byte_item
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

import relora_kernels as rk


def tiny_model_and_optimizer(seed: int = 0):
    """A LoRA GPT and its AdamW after one step, so that the optimizer has state and param_groups (byte items)."""
    torch.manual_seed(seed)
    model = rk.apply_lora(GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8)), LORA_TARGETS,
                          r=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _, loss = model(torch.randint(64, (2, 8)), torch.randint(64, (2, 8)))
    loss.backward()
    optimizer.step()
    return model, optimizer


def write_plain(out_dir: Path, step: int) -> None:
    model, optimizer = tiny_model_and_optimizer(step)
    checkpoints.save_checkpoint(out_dir, step, model, {"step": step, "optimizer": optimizer.state_dict()}, keep=9)


def write_sharded(out_dir: Path, step: int) -> None:
    """The files of fsdp.save: DCP's shards of the model and optimizer, state.pt, DONE."""
    model, optimizer = tiny_model_and_optimizer(step)
    model_state, optim_state = get_state_dict(model, optimizer)
    folder = out_dir / f"ckpt/step_{step:08d}"
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=dcp.FileSystemWriter(folder))
    torch.save({"step": step}, folder / "state.pt")
    checkpoints.mark_done(folder, step=step, world=1)


WRITERS = {"plain": write_plain, "sharded": write_sharded}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def good_run(request, tmp_path_factory):
    """An out_dir with two good checkpoints, steps 5 and 10, in one layout."""
    out_dir = tmp_path_factory.mktemp(request.param)
    for step in (5, 10):
        WRITERS[request.param](out_dir, step)
    return request.param, out_dir


def newest(out_dir: Path) -> tuple[Path, list[str]]:
    logs = []
    found, _ = checkpoints.newest_loadable_checkpoint(out_dir, logs.append)
    return found, logs


def test_a_payload_planted_in_any_file_of_a_checkpoint_never_runs(good_run, tmp_path):
    layout, good = good_run
    names = sorted(f.name for f in (good / "ckpt/step_00000010").iterdir())
    assert names == (["DONE", "model.safetensors", "state.pt"] if layout == "plain" else
                     [".metadata", "DONE", "__0_0.distcp", "state.pt"])
    marker = tmp_path / "payload-ran"
    tried = 0
    # Each file replaced by each payload form; DONE's checksums left (they catch it first) or rewritten to match
    # (as one who planted the file would), which leaves the readers themselves to refuse it.
    for name in names:
        for form, payload in PAYLOADS.items():
            for rewrite_done in (False, True):
                out_dir = tmp_path / f"{name}-{form}-{rewrite_done}"
                shutil.copytree(good, out_dir)
                ckpt = out_dir / "ckpt/step_00000010"
                (ckpt / name).write_bytes(payload(marker))
                if rewrite_done and name != "DONE":
                    checkpoints.mark_done(ckpt, step=10)
                found, logs = newest(out_dir)
                assert not marker.exists(), f"{layout}: a payload in {name} ({form}) ran"
                assert found == out_dir / "ckpt/step_00000005", (name, form, rewrite_done, logs)
                assert len(logs) == 1 and "skipping checkpoint" in logs[0] and "moved it to broken-step_00000010" \
                    in logs[0], logs
                tried += 1
    assert tried == 4 * len(names)


def test_a_planted_dcp_byte_item_is_refused_by_the_check_and_by_the_loader(tmp_path):
    # The optimizer's param_groups are DCP byte items, which DCP's own loader reads with torch.load(weights_only=
    # False). One of them swapped for a payload, .metadata and DONE rewritten to match.
    write_sharded(tmp_path, 5)
    write_sharded(tmp_path, 10)
    ckpt = tmp_path / "ckpt/step_00000010"
    marker = tmp_path / "payload-ran"
    shutil.copytree(ckpt, tmp_path / "planted")
    item = plant_byte_item(tmp_path / "planted", marker)
    assert item.startswith("__0_0.distcp: byte item optim.param_groups.")
    checkpoints.mark_done(tmp_path / "planted", step=10)

    # The loader itself (what fsdp.load runs after the check), into a model of the same structure.
    model, optimizer = tiny_model_and_optimizer()
    with pytest.raises((checkpoints.UnreadableCheckpoint, CheckpointException), match="Weights only load failed"):
        sharded.load(tmp_path / "planted", model, optimizer)
    assert not marker.exists()
    # The check at start-up: the resume falls back to step 5, naming the item.
    shutil.rmtree(ckpt)
    (tmp_path / "planted").rename(ckpt)
    found, logs = newest(tmp_path)
    assert found == tmp_path / "ckpt/step_00000005" and not marker.exists()
    assert f"step_00000010: {item}: Weights only load failed" in logs[0], logs

    # And an unplanted checkpoint loads through the same readers, exactly.
    model, optimizer = tiny_model_and_optimizer(seed=99)
    sharded.load(tmp_path / "ckpt/step_00000005", model, optimizer)
    want, want_optimizer = tiny_model_and_optimizer(5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values(), strict=True))
    assert optimizer.param_groups[0]["lr"] == want_optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("rewrite_done", [False, True], ids=["checksums-kept", "checksums-rewritten"])
def test_bit_flips_in_dcp_metadata_fall_back_to_the_previous_checkpoint(tmp_path, rewrite_done):
    # 40 tries of 4 random bit flips each in .metadata. With DONE's checksums kept (bit rot) every try is caught by
    # them; rewritten to match, the metadata reader meets the flipped bytes itself: each try must either pass the
    # check (a flip in a value it cannot tell, e.g. a save id) or be skipped in one log line, never raise.
    write_sharded(tmp_path / "good", 5)
    write_sharded(tmp_path / "good", 10)
    original = (tmp_path / "good/ckpt/step_00000010/.metadata").read_bytes()
    rng = random.Random(0)
    fell_back = 0
    for attempt in range(40):
        out_dir = tmp_path / f"try{attempt}"
        shutil.copytree(tmp_path / "good", out_dir)
        data = bytearray(original)
        for _ in range(4):
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        ckpt = out_dir / "ckpt/step_00000010"
        (ckpt / ".metadata").write_bytes(bytes(data))
        if rewrite_done:
            checkpoints.mark_done(ckpt, step=10)
        found, logs = newest(out_dir)
        if found == out_dir / "ckpt/step_00000005":
            fell_back += 1
            assert len(logs) == 1 and logs[0].startswith(f"skipping checkpoint {ckpt}: ") and logs[0].endswith(
                "; moved it to broken-step_00000010"), logs
        else:
            assert found == ckpt and not logs, logs
        shutil.rmtree(out_dir)
    assert rewrite_done or fell_back == 40, fell_back


def test_a_skip_message_of_an_exception_without_text_names_its_type(tmp_path, monkeypatch):
    write_plain(tmp_path, 5)
    write_plain(tmp_path, 10)
    real = checkpoints.load_checkpoint_state

    def empty_error(ckpt):
        if ckpt.name == "step_00000010":
            raise OSError()  # str() of it is empty
        return real(ckpt)

    monkeypatch.setattr(checkpoints, "load_checkpoint_state", empty_error)
    found, logs = newest(tmp_path)  # "".splitlines()[0] raised IndexError here
    assert found.name == "step_00000005" and "step_00000010: OSError; moved it" in logs[0], logs
