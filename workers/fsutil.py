"""Atomic directory writes: build beside the target, rename into place, leave nothing on failure."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(target: Path | str, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target`, on any failure
    (an exception, Ctrl-C) it is removed, so a half-written `target` never exists."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    os.chmod(tmp, mode)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path | str, chunk_bytes: int = 8 << 20) -> str:
    """sha256 hex digest of a file, read in chunks into one reused buffer (OSError on failure)."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
