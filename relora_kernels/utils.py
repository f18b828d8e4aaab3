"""Small helpers the package, its example and its benchmarks share: atomic writes (of a file, of a folder) and seeds
from keys."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path, write: Callable[[str], object]) -> None:
    """write(temp_path) then rename over `path`: a crash or kill leaves the old file or the new one, never half of one.
    The temporary file sits beside `path` (same file system, so the rename is atomic) and is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600: give it the mode a plain write would (the old file's, else the umask's).
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        publish(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(final, tmp, *, replace: bool = True) -> Iterator[Path]:
    """Yield the empty folder `tmp` to fill; then rename it to `final`, so that readers see no folder or a whole one.
    On an error inside, `tmp` is removed and the error raised. An existing `final` is replaced (replace=True) or kept
    and `tmp` dropped (replace=False: another process finished the same folder first)."""
    final, tmp = Path(final), Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        publish(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace or not final.is_dir():
            raise


def publish(tmp: Path, final: Path) -> None:
    """The one atomic step of both writers above (and of a folder several processes fill): the data of `tmp` (a file,
    or a folder's files) on disk, then the rename to `final` (not an existing folder), then the rename itself on
    disk. After a crash or power loss `final` is the old version or the new, never a part."""
    for f in [tmp] if tmp.is_file() else [f for f in tmp.iterdir() if f.is_file()]:
        fsync(f)
    os.replace(tmp, final)
    fsync(final.parent)


def fsync(path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def hash_seed(text: str) -> int:
    """A 63-bit seed from a text key (blake2b): the same on every process, platform and run."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
