"""The example's data pipeline (examples/data.py) on the corners of a --data folder: special files, symlinks, a huge
line, and the leftovers of a token-cache build that was killed."""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import data as example_data  # examples/ is on sys.path (conftest.py)
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the example's tokenizer trains; a cache build is killed in a subprocess
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORDS = "the model merges low rank factors into frozen weights def return import class self for in if".split()


def text(seed: int, lines: int = 60) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "\n" for _ in range(lines))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO read, a quadratic tokenizer run): SIGALRM raises in the test."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def build(folder, cache, logs=None) -> example_data.Dataset:
    log = (logs.append if logs is not None else lambda *_: None)
    return example_data.load_data(example_data.prepare_data(str(folder), 300, cache, log=log))


def test_special_files_and_symlinks_in_the_corpus_are_skipped_or_followed_once(tmp_path):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(text(i))
    (elsewhere / "linked.txt").write_text(text(9))
    os.mkfifo(corpus / "pipe.txt")  # reading it waits for a writer for ever
    (corpus / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (corpus / "loop.txt").symlink_to(corpus / "loop.txt")
    (corpus / "sub").symlink_to(elsewhere)  # a symlinked folder: its files belong to the corpus
    (elsewhere / "up").symlink_to(corpus)  # and a loop back up the tree: walked once
    logs = []
    with deadline(60):
        meta = build(corpus, tmp_path / "cache", logs).meta
    names = {name.split("[")[0] for name in meta["train_files"] + meta["val_files"]}
    assert names == {f"doc{i}.txt" for i in range(4)} | {"sub/linked.txt"}, names
    (skipped,) = [line for line in logs if "skipped" in line]
    assert "skipped 3 of 8 files" in skipped, skipped
    assert "pipe.txt: not a regular file (a FIFO, socket or device)" in skipped
    assert "dangling.txt: unreadable (No such file or directory, a symlink)" in skipped
    assert "loop.txt: unreadable (Too many levels of symbolic links, a symlink)" in skipped
    with pytest.raises(ValueError, match="pipe.txt: not a regular file"):
        build(corpus / "pipe.txt", tmp_path / "cache")


def test_files_are_read_in_bounded_chunks_with_the_tokens_of_the_whole(tmp_path, monkeypatch):
    # Chunks cut where the pre-tokenizer splits anyway give the very tokens (and tokenizer) of whole files: built
    # with 512-character chunks and with whole files, the caches are identical.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(text(i, lines=400) + "    indented\n\n\nclass  x:\n  pass\n" * 20)
    whole = build(corpus, tmp_path / "whole")
    monkeypatch.setattr(example_data, "CHUNK_CHARS", 512)
    chunked = build(corpus, tmp_path / "chunked")
    assert (chunked.cache_dir / "tokenizer.json").read_text() == (whole.cache_dir / "tokenizer.json").read_text()
    assert np.array_equal(chunked.train, whole.train) and np.array_equal(chunked.val, whole.val)


def test_a_huge_line_is_read_and_trained_on_in_bounded_pieces(tmp_path, monkeypatch):
    # One line of 300,000 letters and no break: read whole, the BPE trainer took ~30 s on it (its cost grows with
    # the square of a word's length; hundreds of MB never ended) and encoding held it all. Now no text longer than
    # CHUNK_CHARS reaches the tokenizer, and no training run longer than MAX_TRAIN_RUN; the tokens still decode to
    # exactly the file's text.
    monkeypatch.setattr(example_data, "CHUNK_CHARS", 8192, raising=False)  # absent before: no chunks
    rng = random.Random(0)
    huge = "".join(rng.choice("abcdefghij") for _ in range(300_000))
    content = text(1) + huge + "\n" + text(2, lines=1500)  # the last ~10% validate: the huge line trains
    (tmp_path / "one.txt").write_text(content)
    longest = {"train": 0, "encode": 0}
    real_train = example_data.train_tokenizer

    def train_tokenizer(texts, vocab_size):
        def measured():
            for t in texts:  # the longest run of one kind, space or not: a word to the trainer
                longest["train"] = max([longest["train"], *map(len, re.findall(r"\S+|\s+", t))])
                yield t
        tokenizer = real_train(measured(), vocab_size)
        real_encode = tokenizer.encode_batch

        class Measured:  # the tokenizer, with encode_batch measured
            def __getattr__(self, name):
                return getattr(tokenizer, name)

            def encode_batch(self, batch, **options):
                longest["encode"] = max([longest["encode"], *map(len, batch)])
                return real_encode(batch, **options)
        return Measured()

    monkeypatch.setattr(example_data, "train_tokenizer", train_tokenizer)
    with deadline(60):
        data = build(tmp_path / "one.txt", tmp_path / "cache")
    # MAX_TRAIN_RUN and CHUNK_CHARS: the huge line trained, in runs of exactly that length
    assert longest["train"] == 1024 and 0 < longest["encode"] <= 8192, longest
    decoded = data.tokenizer.decode(np.concatenate([data.train[:-1], data.val[:-1]]).tolist())
    assert decoded == content


def test_a_killed_cache_build_is_cleaned_up_by_the_next_but_a_running_one_is_left(tmp_path):
    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text(0))
    # A build killed (SIGKILL, no clean-up) while it writes the tokens.
    script = ("import os, signal, sys, data\n"
              "data._write_tokens = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "data.prepare_data(sys.argv[1], 300, sys.argv[2], log=lambda *_: None)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", script, str(corpus), str(cache)], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p for p in cache.iterdir() if p.is_dir()]
    assert left.name.startswith(".tmp-")
    # Another build in progress (its lock held) on other data: it must be left alone.
    running = cache / ".tmp-0123456789abcdef-1"
    running.mkdir()
    fd = os.open(cache / f"{running.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        logs = []
        build(corpus, cache, logs)
        assert f"data: removed 1 unfinished token cache folder(s) of killed builds in {cache}: {left.name}" in logs
        assert not left.exists() and running.is_dir()
        assert sorted(p.name for p in cache.iterdir()) == sorted([running.name, f"{running.name}.lock",
                                                                   example_data.prepare_data(
                                                                       str(corpus), 300, cache).name])
    finally:
        os.close(fd)
