"""Small helpers the package, its example and its benchmarks share: atomic file writes and seeds from keys."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
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
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def hash_seed(text: str) -> int:
    """A 63-bit seed from a text key (blake2b): the same on every process, platform and run."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
