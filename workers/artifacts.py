"""Move artifact directories between nodes without a shared filesystem.

A directory is described by its files' (relative path, size, sha256). The receiving node pulls
bounded chunks from the node that holds it (the caller supplies `fetch`, e.g. a Ray task pinned
to the source node), verifies every file's hash on arrival, and renames into place atomically.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from workers.fsutil import atomic_dir, sha256_file

CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


def list_files(root: Path | str) -> list[dict]:
    """Every regular file under root with size and sha256 (as dicts, for Ray transport)."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out.append(asdict(FileEntry(str(p.relative_to(root)), p.stat().st_size, sha256_file(p))))
    return out


def read_chunk(root: Path | str, rel: str, offset: int, size: int) -> bytes:
    """Bytes [offset, offset+size) of root/rel."""
    with open(Path(root) / rel, "rb") as f:
        f.seek(offset)
        return f.read(size)


def matches(root: Path | str, entries: list[dict]) -> bool:
    """Whether root holds exactly these files with these sizes and hashes."""
    root = Path(root)
    if not root.is_dir():
        return False
    for e in entries:
        p = root / e["path"]
        if not p.is_file() or p.stat().st_size != e["size"] or sha256_file(p) != e["sha256"]:
            return False
    return True


def receive_dir(target: Path | str, entries: list[dict], fetch: Callable[[str, int, int], bytes],
                chunk_bytes: int = CHUNK_BYTES) -> int:
    """Pull every file through fetch(rel, offset, size), verify hashes, rename into target; returns bytes moved."""
    moved = 0
    with atomic_dir(target) as tmp:
        for e in entries:
            dst = tmp / e["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(dst, "wb") as f:
                offset = 0
                while offset < e["size"]:
                    data = fetch(e["path"], offset, min(chunk_bytes, e["size"] - offset))
                    if not data:
                        raise IOError(f"{e['path']}: source ended at byte {offset} of {e['size']}")
                    f.write(data)
                    h.update(data)
                    offset += len(data)
                f.flush()
                os.fsync(f.fileno())
            if h.hexdigest() != e["sha256"]:
                raise IOError(f"{e['path']}: sha256 mismatch after transfer")
            moved += e["size"]
    return moved
