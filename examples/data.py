"""Text in, token streams out: the data pipeline of the pre-training example. Nothing is downloaded.

    files      the default corpus is the Python standard library of the running interpreter (its .py sources,
               found through sysconfig; tests, site-packages and generated tables left out, ~9 MB on 3.11);
               --data takes a text file or a folder of text files instead; symlinks are followed (a folder once,
               so a loop ends), hidden entries left out
    skipped    files that are not UTF-8 text (binary, Latin-1, ...), special files (FIFOs, sockets, devices) and
               dangling or looping symlinks are left out and named; a corpus that is mostly such files, or a single
               such file, is refused
    split      by file: a fixed ~10% of the files (chosen by a hash of their path, so the split does not depend on
               --seed) is the validation set, unless those files hold over 20% of the text (a single file, a few
               uneven ones): then by position, 10% of the text, whole files in hash order and the last one cut at
               a line break
    tokenizer  a byte-level BPE (GPT-2's scheme) trained with Hugging Face `tokenizers` on the training files only,
               so the validation text is unseen by the model and by the tokenizer alike; or an existing Hugging
               Face tokenizer read from a local folder (--tokenizer, see load_hf_tokenizer)
    tokens     each document encoded (no special tokens added), followed by the end-of-text token (<|endoftext|>,
               or the given tokenizer's eos_token), into train.bin / val.bin: uint16 memmaps, uint32 where the
               vocabulary has more than 65536 tokens
    memory     files are read in pieces of at most CHUNK_CHARS characters, cut where the byte-level BPE's
               pre-tokenizer splits anyway (so the tokens are those of the whole file), or mid-line only in a line
               longer than that; the tokenizer trains on runs of at most MAX_TRAIN_RUN characters without a break
               (its cost grows with the square of a run's length)

Everything is cached in cache_dir/<key>, the key hashing the file list (paths, sizes, mtimes: the manifest, also
kept in meta.json, so that a resumed run can tell a changed corpus) and the tokenizer settings: a second run with
the same data starts at once, and editing a file rebuilds. The cache directory is written under a temporary name and
renamed when complete, so an interrupted build is never mistaken for a cache. A build holds a lock (flock) on a file
beside its temporary folder; the next build removes the temporary folders whose lock nobody holds (builds killed
midway), and leaves those of builds still running.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sysconfig
from contextlib import contextmanager
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
CHUNK_CHARS = 2**20  # a file is read in pieces of at most this many characters
MAX_TRAIN_RUN = 1024  # the tokenizer trains on runs of at most this many characters of one kind (space / not)
# Where a text can be cut without changing its pre-tokens: between a line that ends in a non-space character and
# one that starts with one, or before a single space between two non-space characters.
SAFE_CUTS = (re.compile(r"(?<=\S\n)(?=\S)"), re.compile(r"(?<=\S)(?= \S)"))


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
    images, archives, .pyc files and other encodings (Latin-1, UTF-16) out. Read in blocks: any size fits."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(CHUNK_CHARS)
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:  # e.object: the bytes held back from the last block, then this one
                    at = offset - (len(e.object) - len(block)) + e.start
                    return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {at})"
                if b"\0" in block:
                    return "binary (a NUL byte)"
                if not block:
                    return None
                offset += len(block)
    except OSError as e:
        return f"unreadable ({e.strerror})"


def special_file_reason(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None if it can): a dangling or looping symlink, a FIFO (reading it would
    wait for a writer for ever), a socket, a device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"unreadable ({e.strerror}{', a symlink' if path.is_symlink() else ''})"
    return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, socket or device)"


def text_files(path: Path, log=print) -> tuple[Path, list[Path]]:
    """(root, files) for --data: the file itself, or every text file under a folder (hidden entries skipped).
    Files that are not UTF-8 text are named in the log and left out; raises ValueError if that is most of the
    bytes, or the one file given."""
    if not path.is_dir():
        if reason := special_file_reason(path) or not_text_reason(path):
            raise ValueError(f"--data {path}: {reason}; give UTF-8 text")
        return path.parent, [path]
    files = []
    seen_dirs = set()  # (device, inode) of every folder walked: a symlink back up the tree is walked once
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    reasons = {f: special_file_reason(f) or not_text_reason(f) for f in files}
    sizes = {f: 0 if reasons[f] and not os.path.isfile(f) else f.stat().st_size for f in files}
    skipped = [f for f in files if reasons[f]]
    if skipped:
        shown = "; ".join(f"{f.relative_to(path)}: {reasons[f]}" for f in skipped[:5])
        log(f"data: skipped {len(skipped)} of {len(files)} files, not UTF-8 text: {shown}"
            + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
        skipped_bytes, total = sum(sizes[f] for f in skipped), sum(sizes.values())
        if skipped_bytes > 0.5 * total:
            raise ValueError(f"--data {path}: {len(skipped)} of {len(files)} files, "
                             f"{skipped_bytes / max(total, 1):.0%} of the bytes, are not UTF-8 text; convert them "
                             "(e.g. iconv -f latin1 -t utf-8) or leave them out")
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
    length = sum(len(chunk) for chunk in _read_chunks(cut_file))
    keep = length - int(length * (budget - sum(sizes[g] for g in whole)) / max(sizes[cut_file], 1))
    cut = _line_start_at_or_before(cut_file, keep) or keep
    train = [(f, 0, cut) if f == cut_file else (f, 0, None) for f in files if f not in whole]
    return train, [(cut_file, cut, None)] + [(f, 0, None) for f in files if f in whole]


def _line_start_at_or_before(path: Path, offset: int) -> int:
    """The character offset of the last line start at or before `offset` in `path` (0 if the first line)."""
    start, position = 0, 0
    for chunk in _read_chunks(path, stop=offset):
        if (newline := chunk.rfind("\n")) >= 0:
            start = position + newline + 1
        position += len(chunk)
    return start


def _piece_name(root: Path, piece: Piece) -> str:
    path, start, stop = piece
    rel = str(path.relative_to(root))
    return rel if (start, stop) == (0, None) else f"{rel}[{start or ''}:{'' if stop is None else stop}]"


def _read_chunks(path: Path, start: int = 0, stop: int | None = None):
    """The text of `path` from character `start` to `stop`, in pieces of at most CHUNK_CHARS characters, each cut
    where the BPE's pre-tokenizer splits anyway (SAFE_CUTS), so that encoding them one by one gives the tokens of
    the whole; a stretch of CHUNK_CHARS with no such place (one huge line) is cut where it ends."""
    with open(path, encoding="utf-8") as f:
        to_skip = start
        while to_skip > 0 and (skipped := len(f.read(min(to_skip, CHUNK_CHARS)))):
            to_skip -= skipped
        left = None if stop is None else max(stop - start, 0)
        pending = ""
        while True:
            want = CHUNK_CHARS + 1 - len(pending) if left is None else min(CHUNK_CHARS + 1 - len(pending), left)
            block = f.read(want) if want > 0 else ""
            if left is not None:
                left -= len(block)
            pending += block
            while len(pending) > CHUNK_CHARS:
                cut = _safe_cut(pending[: CHUNK_CHARS + 1])
                yield pending[:cut]
                pending = pending[cut:]
            if not block:
                if pending:
                    yield pending
                return


def _safe_cut(text: str) -> int:
    """The last place in `text` (after its first character) where SAFE_CUTS allow a cut; else its length - 1."""
    for pattern in SAFE_CUTS:
        found = [m.start() for m in pattern.finditer(text, 1)]
        if found:
            return found[-1]
    return len(text) - 1


def _read_piece(piece: Piece):
    """A piece's text, in chunks (see _read_chunks)."""
    path, start, stop = piece
    return _read_chunks(path, start, stop)


def _training_runs(chunks):
    """The tokenizer's training texts: the chunks, with every run of over MAX_TRAIN_RUN characters of one kind
    (space or not) split into pieces of that length: the BPE trainer's cost grows with the square of a word's
    length, and a word so long is not one to learn merges from."""
    long_run = re.compile(rf"(\S{{{MAX_TRAIN_RUN}}}|\s{{{MAX_TRAIN_RUN}}})")
    for chunk in chunks:
        if len(chunk) <= MAX_TRAIN_RUN:
            yield chunk
        else:
            yield from (part for part in long_run.split(chunk) if part)


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


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def load_hf_tokenizer(folder: str | Path) -> tuple[str, str]:
    """(tokenizer.json text, end-of-text token) of the Hugging Face tokenizer saved in `folder`, read with
    AutoTokenizer(local_files_only=True): nothing is downloaded. It must be a fast tokenizer (one backed by the
    `tokenizers` library, which is what the cache and the checkpoints keep) with an eos_token, the token that ends
    each document. ValueError otherwise."""
    from transformers import AutoTokenizer

    if not Path(folder).expanduser().is_dir():
        raise ValueError(f"--tokenizer {folder}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {folder}: not a Hugging Face tokenizer folder ({str(e).splitlines()[0]})") \
            from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"--tokenizer {folder}: {type(tokenizer).__name__} is a slow tokenizer; give a folder with "
                         "a tokenizer.json (a fast tokenizer)")
    if tokenizer.eos_token is None:
        raise ValueError(f"--tokenizer {folder}: it has no eos_token to end each document with")
    return backend.to_str(), tokenizer.eos_token


def _write_tokens(tokenizer, documents, path: Path, eot_token: str, dtype: str) -> int:
    """Encode documents (an iterable of documents, each an iterable of text chunks) into a file of `dtype` ids,
    each document followed by eot_token; returns the token count. No special tokens are added to the chunks (a
    given tokenizer's post-processor would put a BOS before every one)."""
    eot = tokenizer.token_to_id(eot_token)
    count = 0
    with open(path, "wb") as f:
        batch, ends, size = [], [], 0  # texts to encode, and whether each ends its document

        def add(text: str, end: bool):
            nonlocal batch, ends, size, count
            batch.append(text)
            ends.append(end)
            size += len(text)
            if size >= ENCODE_CHUNK_BYTES:
                flush()

        def flush():
            nonlocal batch, ends, size, count
            ids = [i for enc, end in zip(tokenizer.encode_batch(batch, add_special_tokens=False), ends, strict=True)
                   for i in (*enc.ids, *((eot,) if end else ()))]
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            count += len(ids)
            batch, ends, size = [], [], 0

        for chunks in documents:
            previous = None
            for chunk in chunks:
                if previous is not None:
                    add(previous, False)
                previous = chunk
            add(previous or "", True)
        if batch:
            flush()
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


def _cache_key(source: str, root: Path, manifest: list[list], vocab_size: int, tokenizer_json: str | None,
               eot: str = EOT) -> str:
    blob = json.dumps([CACHE_VERSION, source, str(root.resolve()), vocab_size, VAL_FRACTION, manifest])
    if tokenizer_json is not None:  # a given tokenizer, not one trained on these files
        blob += hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if eot != EOT:
        blob += json.dumps(["eot", eot])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Dataset:
    train: np.ndarray  # memmap of the training token stream (uint16, or uint32 for a large vocabulary)
    val: np.ndarray
    tokenizer: object  # tokenizers.Tokenizer
    meta: dict
    cache_dir: Path

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eot(self) -> str:
        """The token that ends each document."""
        return self.meta.get("eot", EOT)


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
                 allow_change: bool = False, eot: str = EOT) -> Path:
    """Build (or find) the cache for this data and tokenizer setting; returns its directory. Run on one process.

    tokenizer_json: a tokenizer to use instead of training one (a resumed run's, from its checkpoint, or one read
    by load_hf_tokenizer), with eot its end-of-text token; vocab_size is then that tokenizer's. A resumed run also
    passes its corpus manifest: if the files differ from it, ValueError names what changed, unless allow_change.
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
    if (trained / "meta.json").exists() and (tokenizer_json is None or (
            (trained / "tokenizer.json").read_text() == tokenizer_json and eot == EOT)):
        return trained
    out = trained if tokenizer_json is None else cache_root / _cache_key(source, root, current, vocab_size,
                                                                         tokenizer_json, eot)
    if not (out / "meta.json").exists():
        remove_abandoned_builds(cache_root, log)
        _build_cache(out, source, root, files, current, vocab_size, tokenizer_json, log, eot)
    return out


@contextmanager
def _building(tmp: Path):
    """Hold the lock that tells other processes the temporary folder `tmp` is being filled (taken before the folder
    exists, unlocked and removed after it is renamed or removed)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    lock = tmp.with_name(f"{tmp.name}.lock")
    while True:  # until the file locked is the one at that path (a cleaner may remove a lock file not yet locked)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def remove_abandoned_builds(cache_root: Path, log) -> None:
    """Remove the temporary folders (and lock files) of builds that were killed: those whose lock nobody holds."""
    removed = []
    folders = [d for d in cache_root.glob(".tmp-*") if d.is_dir()]
    orphan_locks = [f for f in cache_root.glob(".tmp-*.lock") if not f.with_name(f.name[:-5]).exists()]
    for tmp in sorted(folders + orphan_locks):
        lock = tmp if tmp.name.endswith(".lock") else tmp.with_name(f"{tmp.name}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if tmp != lock:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
            lock.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # a build in progress holds it
        finally:
            os.close(fd)
    if removed:
        log(f"data: removed {len(removed)} unfinished token cache folder(s) of killed builds in {cache_root}: "
            f"{', '.join(removed)}")


def _build_cache(out: Path, source: str, root: Path, files: list[Path], manifest: list[list], vocab_size: int,
                 tokenizer_json: str | None, log, eot: str = EOT) -> None:
    from tokenizers import Tokenizer

    total_mb = sum(f.stat().st_size for f in files) / 2**20
    what = f"the Python {sysconfig.get_python_version()} standard library" if source == "python-stdlib" else source
    log(f"data: {what}: {len(files)} files, {total_mb:.1f} MiB; "
        + ("tokenising with the given tokenizer" if tokenizer_json else
           f"training a {vocab_size}-token byte-level BPE and tokenising")
        + f" into {out} (once; cached)")
    train_pieces, val_pieces = split_pieces(root, files)

    # Generators, so that a large corpus is read chunk by chunk rather than held in memory (it is read twice:
    # once to train the tokenizer, once to encode).
    def docs(pieces):
        return (_read_piece(piece) for piece in pieces)

    def training_texts(pieces):
        return _training_runs(chunk for piece in pieces for chunk in _read_piece(piece))

    # Another process may finish the same cache first (replace=False): its copy is as good as ours.
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    with _building(tmp), atomic_folder(out, tmp, replace=False):
        if tokenizer_json is None:
            tokenizer = train_tokenizer(training_texts(train_pieces), vocab_size)
            tokenizer.save(str(tmp / "tokenizer.json"))
        else:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
            tokenizer = Tokenizer.from_str(tokenizer_json)
        if tokenizer.token_to_id(eot) is None:
            raise ValueError(f"the tokenizer has no token {eot!r} to end each document with")
        dtype = token_dtype(tokenizer.get_vocab_size())
        n_train = _write_tokens(tokenizer, docs(train_pieces), tmp / "train.bin", eot, dtype)
        n_val = _write_tokens(tokenizer, docs(val_pieces), tmp / "val.bin", eot, dtype)
        meta = dict(
            source=source, root=str(root), vocab_size=tokenizer.get_vocab_size(), eot_id=tokenizer.token_to_id(eot),
            train_tokens=n_train, val_tokens=n_val, train_files=[_piece_name(root, p) for p in train_pieces],
            val_files=[_piece_name(root, p) for p in val_pieces], dtype=dtype, manifest=manifest,
        )
        if eot != EOT:  # the default is left out, so caches built before the option read the same
            meta["eot"] = eot
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"data: {n_train:,} train tokens ({len(train_pieces)} files), {n_val:,} val tokens ({len(val_pieces)} "
        f"files), {total_mb * 2**20 / max(n_train + n_val, 1):.2f} bytes/token")


def load_data(cache: Path) -> Dataset:
    from tokenizers import Tokenizer

    meta = json.loads((cache / "meta.json").read_text())
    dtype = meta.get("dtype", "uint16")
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r")
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
