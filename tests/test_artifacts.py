"""Moving artifact directories in bounded chunks, verified by hash, atomically."""
from __future__ import annotations

import os

import pytest

from workers.artifacts import list_files, matches, read_chunk, receive_dir


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(100_003))
    (src / "sub" / "b.json").write_bytes(os.urandom(517))
    return src


def test_receive_dir_in_small_chunks_reproduces_the_source(source, tmp_path):
    entries = list_files(source)
    calls = []

    def fetch(rel, offset, size):
        calls.append(size)
        return read_chunk(source, rel, offset, size)

    moved = receive_dir(tmp_path / "dst", entries, fetch, chunk_bytes=4096)
    assert moved == 100_003 + 517 and max(calls) == 4096 and len(calls) == 25 + 1
    assert matches(tmp_path / "dst", entries)
    assert (tmp_path / "dst" / "a.bin").read_bytes() == (source / "a.bin").read_bytes()


def test_corrupted_transfer_leaves_nothing(source, tmp_path):
    entries = list_files(source)

    def flipping_fetch(rel, offset, size):
        data = bytearray(read_chunk(source, rel, offset, size))
        data[0] ^= 0xFF
        return bytes(data)

    with pytest.raises(IOError, match="sha256 mismatch"):
        receive_dir(tmp_path / "dst", entries, flipping_fetch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_matches_detects_a_changed_file(source):
    entries = list_files(source)
    assert matches(source, entries)
    (source / "sub" / "b.json").write_bytes(os.urandom(517))
    assert not matches(source, entries)
