"""Text in, uint16 token streams out: the data pipeline of the pre-training example. Nothing is downloaded.

    files      the default corpus is the Python standard library of the running interpreter (its .py sources,
               found through sysconfig; tests, site-packages and generated tables left out, ~9 MB on 3.11);
               --data takes a text file or a folder of text files instead
    split      by file: a fixed ~10% of the files (chosen by a hash of their path, so the split does not depend on
               --seed) is the validation set; a single file is split at 90% of its text
    tokenizer  a byte-level BPE (GPT-2's scheme) trained with Hugging Face `tokenizers` on the training files only,
               so the validation text is unseen by the model and by the tokenizer alike
    tokens     each document encoded, followed by <|endoftext|>, into train.bin / val.bin (uint16 memmaps)

Everything is cached in cache_dir/<key>, the key hashing the file list (paths, sizes, mtimes) and the tokenizer
settings: a second run with the same data starts at once, and editing a file rebuilds. The cache directory is
written under a temporary name and renamed when complete, so an interrupted build is never mistaken for a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE_VERSION = 1  # bump when the cache layout or the tokenisation changes
EOT = "<|endoftext|>"
VAL_FRACTION = 0.1
# Directories of the standard library that are not library source: its test suites, IDLE, installed packages, and
# two of generated data (codec tables, pydoc's topic strings) that would otherwise be a fifth of the corpus.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
                    "encodings", "pydoc_data"}
ENCODE_CHUNK_BYTES = 32 * 2**20  # encode in chunks of ~32 MiB of text, so large corpora stay within memory


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "relora-kernels" / "data"


# ----------------------------------------------------------------------------------------------------------------
# Finding the files
# ----------------------------------------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    """The .py files of the running interpreter's standard library, without its tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("test"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return root, files


def _is_text(path: Path) -> bool:
    # A file is text if it decodes as UTF-8 and has no NUL byte; that keeps images, archives and .pyc files out.
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in data


def text_files(path: Path) -> tuple[Path, list[Path]]:
    """(root, files) for --data: the file itself, or every text file under a folder (hidden entries skipped)."""
    if path.is_file():
        return path.parent, [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return path, [f for f in files if _is_text(f)]


def _val_order(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def split_files(root: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Train/val split by file: the ~10% of files whose path hashes lowest go to validation (at least one)."""
    by_hash = sorted(files, key=lambda f: _val_order(str(f.relative_to(root))))
    n_val = max(1, round(VAL_FRACTION * len(files)))
    val = set(by_hash[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and token streams
# ----------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (GPT-2's: bytes mapped to printable characters, so any text round-trips exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _write_tokens(tokenizer, documents, path: Path) -> int:
    """Encode documents (an iterable of str) into a uint16 file, each followed by EOT; returns the token count."""
    eot = tokenizer.token_to_id(EOT)
    count = 0
    with open(path, "wb") as f:

        def flush(batch):
            nonlocal count
            ids = [i for enc in tokenizer.encode_batch(batch) for i in (*enc.ids, eot)]
            f.write(np.asarray(ids, dtype=np.uint16).tobytes())
            count += len(ids)

        batch, size = [], 0
        for text in documents:
            batch.append(text)
            size += len(text)
            if size >= ENCODE_CHUNK_BYTES:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
    return count


def _cache_key(source: str, root: Path, files: list[Path], vocab_size: int) -> str:
    listing = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([CACHE_VERSION, source, str(root.resolve()), vocab_size, VAL_FRACTION, listing])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Dataset:
    train: np.ndarray  # uint16 memmap of the training token stream
    val: np.ndarray
    tokenizer: object  # tokenizers.Tokenizer
    meta: dict
    cache_dir: Path

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def prepare_data(data: str | None, vocab_size: int, cache_dir: str | Path | None = None, log=print) -> Path:
    """Build (or find) the cache for this data and tokenizer setting; returns its directory. Run on one process."""
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--data {data}: no such file or folder")
        source = str(path.resolve())
        root, files = text_files(path)
        if not files:
            raise ValueError(f"--data {data}: no UTF-8 text files found")
    else:
        source = "python-stdlib"
        root, files = stdlib_files()
        if not files:
            raise ValueError(f"no .py files found in the standard library at {root}; pass --data")

    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache_root / _cache_key(source, root, files, vocab_size)
    if (out / "meta.json").exists():
        return out

    total_mb = sum(f.stat().st_size for f in files) / 2**20
    what = f"the Python {sysconfig.get_python_version()} standard library" if source == "python-stdlib" else source
    log(f"data: {what}: {len(files)} files, {total_mb:.1f} MiB; training a {vocab_size}-token byte-level BPE and "
        f"tokenising into {out} (once; cached)")
    if len(files) == 1:
        # One file cannot be split by file: its first 90% (cut at a line break) trains, the rest validates.
        text = _read_text(files[0])
        cut = text.rfind("\n", 0, int(len(text) * (1 - VAL_FRACTION))) + 1 or int(len(text) * (1 - VAL_FRACTION))
        train_names, val_names = [f"{files[0].name}[:{cut}]"], [f"{files[0].name}[{cut}:]"]

        def train_docs():
            return iter([text[:cut]])

        def val_docs():
            return iter([text[cut:]])
    else:
        train_files, val_files = split_files(root, files)
        train_names = [str(f.relative_to(root)) for f in train_files]
        val_names = [str(f.relative_to(root)) for f in val_files]

        # Generators, so that a large corpus is read file by file rather than held in memory (it is read twice:
        # once to train the tokenizer, once to encode).
        def train_docs():
            return (_read_text(f) for f in train_files)

        def val_docs():
            return (_read_text(f) for f in val_files)

    tmp = cache_root / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer(train_docs(), vocab_size)
    tokenizer.save(str(tmp / "tokenizer.json"))
    n_train = _write_tokens(tokenizer, train_docs(), tmp / "train.bin")
    n_val = _write_tokens(tokenizer, val_docs(), tmp / "val.bin")
    meta = dict(
        source=source, root=str(root), vocab_size=tokenizer.get_vocab_size(), eot_id=tokenizer.token_to_id(EOT),
        train_tokens=n_train, val_tokens=n_val, train_files=train_names, val_files=val_names, dtype="uint16",
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished the same cache first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: {n_train:,} train tokens ({len(train_names)} files), {n_val:,} val tokens ({len(val_names)} files), "
        f"{total_mb * 2**20 / max(n_train + n_val, 1):.2f} bytes/token")
    return out


def load_data(cache: Path) -> Dataset:
    from tokenizers import Tokenizer

    meta = json.loads((cache / "meta.json").read_text())
    train = np.memmap(cache / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(cache / "val.bin", dtype=np.uint16, mode="r")
    return Dataset(train, val, Tokenizer.from_file(str(cache / "tokenizer.json")), meta, cache)


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def batch_seed(*key) -> int:
    """A 63-bit seed from any key, e.g. (seed, "train", step, micro_step, rank)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, device="cpu"):
    """batch_size random windows of block_size + 1 tokens: inputs x and next-token targets y, both (B, T) int64.

    The windows are a pure function of `seed`, so the batch of any step can be recomputed: that is all the "data
    position" a checkpoint needs for an exact resume, and every rank draws its own batches from its own key.
    """
    if len(tokens) <= block_size + 1:
        raise ValueError(f"a split has {len(tokens)} tokens, fewer than block_size + 2 = {block_size + 2}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=g).tolist()
    windows = torch.from_numpy(np.stack([tokens[s : s + block_size + 1].astype(np.int64) for s in starts]))
    x, y = windows[:, :-1], windows[:, 1:]
    if device != "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
