"""Text in, uint16 token streams out: the data pipeline of the pre-training example. Nothing is downloaded.

    files      the default corpus is the Python standard library of the running interpreter (its .py sources,
               found through sysconfig; tests, site-packages and generated tables left out, ~9 MB on 3.11);
               --data takes a text file or a folder of text files instead
    skipped    files that are not UTF-8 text (binary, Latin-1, ...) are left out and named; a corpus that is mostly
               such files, or a single such file, is refused
    split      by file: a fixed ~10% of the files (chosen by a hash of their path, so the split does not depend on
               --seed) is the validation set, unless those files hold over 20% of the text (a single file, a few
               uneven ones): then by position, 10% of the text, whole files in hash order and the last one cut at
               a line break
    tokenizer  a byte-level BPE (GPT-2's scheme) trained with Hugging Face `tokenizers` on the training files only,
               so the validation text is unseen by the model and by the tokenizer alike
    tokens     each document encoded, followed by <|endoftext|>, into train.bin / val.bin (uint16 memmaps)

Everything is cached in cache_dir/<key>, the key hashing the file list (paths, sizes, mtimes: the manifest, also
kept in meta.json, so that a resumed run can tell a changed corpus) and the tokenizer settings: a second run with
the same data starts at once, and editing a file rebuilds. The cache directory is written under a temporary name and
renamed when complete, so an interrupted build is never mistaken for a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relora_kernels.utils import atomic_folder, hash_seed

CACHE_VERSION = 2  # bump when the cache layout or the tokenisation changes
EOT = "<|endoftext|>"
VAL_FRACTION = 0.1
MAX_VAL_SHARE = 0.2  # a by-file split giving validation more of the text than this splits by position instead
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


def not_text_reason(path: Path) -> str | None:
    """Why `path` is not UTF-8 text (None if it is): text decodes as UTF-8 and has no NUL byte, which keeps
    images, archives, .pyc files and other encodings (Latin-1, UTF-16) out."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except OSError as e:
        return f"unreadable ({e.strerror})"
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
    return "binary (a NUL byte)" if b"\0" in data else None


def text_files(path: Path, log=print) -> tuple[Path, list[Path]]:
    """(root, files) for --data: the file itself, or every text file under a folder (hidden entries skipped).
    Files that are not UTF-8 text are named in the log and left out; raises ValueError if that is most of the
    bytes, or the one file given."""
    if path.is_file():
        if reason := not_text_reason(path):
            raise ValueError(f"--data {path}: {reason}; give UTF-8 text")
        return path.parent, [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    reasons = {f: not_text_reason(f) for f in files}
    skipped = [f for f in files if reasons[f]]
    if skipped:
        shown = "; ".join(f"{f.relative_to(path)}: {reasons[f]}" for f in skipped[:5])
        log(f"data: skipped {len(skipped)} of {len(files)} files, not UTF-8 text: {shown}"
            + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
        skipped_bytes = sum(f.stat().st_size for f in skipped)
        if skipped_bytes > 0.5 * sum(f.stat().st_size for f in files):
            raise ValueError(f"--data {path}: {len(skipped)} of {len(files)} files, "
                             f"{skipped_bytes / max(sum(f.stat().st_size for f in files), 1):.0%} of the bytes, are "
                             "not UTF-8 text; convert them (e.g. iconv -f latin1 -t utf-8) or leave them out")
    return path, [f for f in files if not reasons[f]]


def _val_order(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def split_files(root: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Train/val split by file: the ~10% of files whose path hashes lowest go to validation (at least one)."""
    by_hash = sorted(files, key=lambda f: _val_order(str(f.relative_to(root))))
    n_val = max(1, round(VAL_FRACTION * len(files)))
    val = set(by_hash[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


# A piece of the corpus: a file's text, or the slice [start:stop) of it (character offsets).
Piece = tuple[Path, int, int | None]


def split_pieces(root: Path, files: list[Path]) -> tuple[list[Piece], list[Piece]]:
    """(train, val) pieces: split_files' by-file split, or if that gives validation over MAX_VAL_SHARE of the
    bytes, a split by position: the files in hash order go to validation whole while they fit in VAL_FRACTION of
    the bytes, and the next is cut at a line break, its tail validating and its head training."""
    sizes = {f: f.stat().st_size for f in files}
    total = max(sum(sizes.values()), 1)
    train, val = split_files(root, files)
    if sum(sizes[f] for f in val) <= MAX_VAL_SHARE * total:
        return [(f, 0, None) for f in train], [(f, 0, None) for f in val]
    budget, whole = VAL_FRACTION * total, []
    by_hash = sorted(files, key=lambda f: _val_order(str(f.relative_to(root))))
    while sum(sizes[g] for g in whole) + sizes[by_hash[len(whole)]] <= budget:
        whole.append(by_hash[len(whole)])
    cut_file = by_hash[len(whole)]  # exists: validation by file held over MAX_VAL_SHARE, so not every file fits
    text = _read_text(cut_file)
    keep = len(text) - int(len(text) * (budget - sum(sizes[g] for g in whole)) / max(sizes[cut_file], 1))
    cut = text.rfind("\n", 0, keep) + 1 or keep
    train = [(f, 0, cut) if f == cut_file else (f, 0, None) for f in files if f not in whole]
    return train, [(cut_file, cut, None)] + [(f, 0, None) for f in files if f in whole]


def _piece_name(root: Path, piece: Piece) -> str:
    path, start, stop = piece
    rel = str(path.relative_to(root))
    return rel if (start, stop) == (0, None) else f"{rel}[{start or ''}:{'' if stop is None else stop}]"


def _read_piece(piece: Piece) -> str:
    path, start, stop = piece
    return _read_text(path)[start:stop]


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


def corpus_manifest(root: Path, files: list[Path]) -> list[list]:
    """[relative path, size, mtime_ns] of each file: what the cache key hashes, and a checkpoint records."""
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def manifest_changes(saved: list[list], current: list[list]) -> str:
    """What differs between two manifests, in words ("" if nothing): added, removed and modified files."""
    old, new = ({name: rest for name, *rest in m} for m in (saved, current))

    def names(found):
        return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")

    parts = [f"{what} {names(found)}" for what, found in (
        ("added", [n for n in new if n not in old]), ("removed", [n for n in old if n not in new]),
        ("modified", [n for n in new if n in old and new[n] != old[n]])) if found]
    return "; ".join(parts)


def _cache_key(source: str, root: Path, manifest: list[list], vocab_size: int, tokenizer_json: str | None) -> str:
    blob = json.dumps([CACHE_VERSION, source, str(root.resolve()), vocab_size, VAL_FRACTION, manifest])
    if tokenizer_json is not None:  # a given tokenizer, not one trained on these files
        blob += hashlib.sha256(tokenizer_json.encode()).hexdigest()
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
    return path.read_text(encoding="utf-8")  # the files were checked to be UTF-8 (text_files)


def find_corpus(data: str | None, log=print) -> tuple[str, Path, list[Path]]:
    """(source, root, files) of --data, or of the standard library when it is None."""
    if not data:
        root, files = stdlib_files()
        if not files:
            raise ValueError(f"no .py files found in the standard library at {root}; pass --data")
        return "python-stdlib", root, files
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    root, files = text_files(path, log)
    if not files:
        raise ValueError(f"--data {data}: no UTF-8 text files found")
    return str(path.resolve()), root, files


def prepare_data(data: str | None, vocab_size: int, cache_dir: str | Path | None = None, log=print, *,
                 tokenizer_json: str | None = None, manifest: list[list] | None = None,
                 allow_change: bool = False) -> Path:
    """Build (or find) the cache for this data and tokenizer setting; returns its directory. Run on one process.

    A resumed run passes its checkpoint's tokenizer (tokenizer_json, used instead of training one) and corpus
    manifest: if the files differ from it, ValueError names what changed, unless allow_change.
    """
    source, root, files = find_corpus(data, log)
    current = corpus_manifest(root, files)
    if manifest is not None and (changes := manifest_changes(manifest, current)):
        if not allow_change:
            raise ValueError(f"--data {data or source} changed since the checkpoint: {changes}. Resume on the "
                             "checkpoint's files, or pass --allow_data_change to go on with these (tokenised with "
                             "the checkpoint's tokenizer; the val split may move)")
        log(f"data: changed since the checkpoint ({changes}); going on with the checkpoint's tokenizer")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    trained = cache_root / _cache_key(source, root, current, vocab_size, None)
    if (trained / "meta.json").exists() and (tokenizer_json is None or
                                             (trained / "tokenizer.json").read_text() == tokenizer_json):
        return trained
    out = trained if tokenizer_json is None else cache_root / _cache_key(source, root, current, vocab_size,
                                                                         tokenizer_json)
    if not (out / "meta.json").exists():
        _build_cache(out, source, root, files, current, vocab_size, tokenizer_json, log)
    return out


def _build_cache(out: Path, source: str, root: Path, files: list[Path], manifest: list[list], vocab_size: int,
                 tokenizer_json: str | None, log) -> None:
    from tokenizers import Tokenizer

    total_mb = sum(f.stat().st_size for f in files) / 2**20
    what = f"the Python {sysconfig.get_python_version()} standard library" if source == "python-stdlib" else source
    log(f"data: {what}: {len(files)} files, {total_mb:.1f} MiB; "
        + ("tokenising with the checkpoint's tokenizer" if tokenizer_json else
           f"training a {vocab_size}-token byte-level BPE and tokenising")
        + f" into {out} (once; cached)")
    train_pieces, val_pieces = split_pieces(root, files)

    # Generators, so that a large corpus is read file by file rather than held in memory (it is read twice:
    # once to train the tokenizer, once to encode).
    def docs(pieces):
        return (_read_piece(piece) for piece in pieces)

    # Another process may finish the same cache first (replace=False): its copy is as good as ours.
    with atomic_folder(out, out.parent / f".tmp-{out.name}-{os.getpid()}", replace=False) as tmp:
        if tokenizer_json is None:
            tokenizer = train_tokenizer(docs(train_pieces), vocab_size)
            tokenizer.save(str(tmp / "tokenizer.json"))
        else:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
            tokenizer = Tokenizer.from_str(tokenizer_json)
        n_train = _write_tokens(tokenizer, docs(train_pieces), tmp / "train.bin")
        n_val = _write_tokens(tokenizer, docs(val_pieces), tmp / "val.bin")
        meta = dict(
            source=source, root=str(root), vocab_size=tokenizer.get_vocab_size(), eot_id=tokenizer.token_to_id(EOT),
            train_tokens=n_train, val_tokens=n_val, train_files=[_piece_name(root, p) for p in train_pieces],
            val_files=[_piece_name(root, p) for p in val_pieces], dtype="uint16", manifest=manifest,
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"data: {n_train:,} train tokens ({len(train_pieces)} files), {n_val:,} val tokens ({len(val_pieces)} "
        f"files), {total_mb * 2**20 / max(n_train + n_val, 1):.2f} bytes/token")


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
    return hash_seed(repr(key))


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
