"""Read and validate a Hugging Face safetensors checkpoint directory without loading its weights.

`open_checkpoint(dir)` parses config.json and every safetensors header (8-byte little-endian
length, JSON header) and checks that each tensor the model needs is present, floating point and
shaped as config.json says. `read_rows` streams row ranges of one tensor through safetensors'
memory map, opening the file per call so that no more than the requested slice stays resident.
`hash_sources` gives the sha256 of each source file, cached by (size, mtime, inode).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CheckpointError
from workers import fsutil
from workers.layout import required_sources, source_shape
from workers.models.config import ModelConfig, load_model_config

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
# safetensors dtype -> (torch dtype name, bytes per element); only floating types are weights.
FLOAT_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_READ_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives and what it is."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its config, files, and every tensor the model needs."""

    model_dir: Path
    config: ModelConfig
    weight_files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]  # only the tensors the model needs (layout.required_sources)

    def source_files(self) -> list[Path]:
        """Files whose content defines the converted shards: config, index, weights, tokenizer."""
        extra = [self.model_dir / n for n in ("config.json", INDEX_FILE, *TOKENIZER_FILES)]
        return sorted({*self.weight_files, *(p for p in extra if p.is_file())})

    def tokenizer_files(self) -> list[Path]:
        return [self.model_dir / n for n in TOKENIZER_FILES if (self.model_dir / n).is_file()]


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; returns (header dict, data section start). Checks bounds."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(int(x) for x in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_BYTES and b - a != numel * DTYPE_BYTES[dtype] or not 0 <= a <= b:
            raise CheckpointError(f"{path}: tensor '{name}': byte range {a}..{b} does not match {dtype} shape {list(shape)}")
        end = max(end, b)
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: header needs {data_start + end} bytes, file has {size}"
        )
    return header, data_start


def _weight_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Safetensors files of the checkpoint and, when an index exists, its weight map."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot read weight_map: {e}") from None
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which does not exist in {model_dir}")
        return files, weight_map
    files = sorted(model_dir.glob("*.safetensors"))
    # Mistral repos also ship consolidated.safetensors (other tensor names) beside the HF files
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    files = hf_files or files
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (only safetensors checkpoints are supported)")
    return files, None


def open_checkpoint(model_dir: Path | str) -> Checkpoint:
    """Parse and validate a checkpoint directory: config, headers, names, shapes, dtypes."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected a Hugging Face checkpoint directory)")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise CheckpointError(f"{model_dir}: checkpoint directory is not readable")
    cfg = load_model_config(model_dir)
    files, weight_map = _weight_files(model_dir)
    found: dict[str, TensorInfo] = {}
    for path in files:
        header, _ = read_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name in found:
                raise CheckpointError(f"{path}: tensor '{name}' also appears in {found[name].file.name}")
            found[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), tuple(meta["data_offsets"]))
    tensors = {}
    for name in required_sources(cfg):
        info = found.get(name)
        if info is None:
            where = f"{model_dir / INDEX_FILE}" if weight_map is not None and name in weight_map else str(model_dir)
            raise CheckpointError(f"{where}: missing tensor '{name}' (needed by {cfg.architecture})")
        if weight_map is not None and weight_map.get(name) not in (None, info.file.name):
            raise CheckpointError(f"{model_dir / INDEX_FILE}: says '{name}' is in {weight_map[name]}, found in {info.file.name}")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has unsupported dtype {info.dtype} "
                f"(expected one of {', '.join(FLOAT_DTYPES)})"
            )
        want = source_shape(cfg, name)
        if info.shape != want:
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)}, config.json implies {list(want)}"
            )
        tensors[name] = info
    unused = sorted(set(found) - set(tensors))
    if unused:
        log.debug("%s: ignoring %d tensors the model does not use: %s", model_dir, len(unused), unused[:5])
    return Checkpoint(model_dir, cfg, tuple(files), tensors)


def read_rows(info: TensorInfo, index: tuple[slice, ...]):
    """Materialise info[index] (a tuple of slices) as a torch tensor, reading only that slice."""
    from safetensors import safe_open

    try:
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_slice(info.name)[index]
        return t
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.name}': {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError for malformed files
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.name}': {e}") from None


# --- source hashes ------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    """sha256 hex digest of a source file, read in 8 MiB chunks; unreadable -> CheckpointError."""
    try:
        return fsutil.sha256_file(path, HASH_READ_BYTES)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def hash_sources(files: list[Path], cache_path: Path | None = None) -> dict[str, str]:
    """{file name: sha256} for the given files; reuses cached digests whose size/mtime/inode match."""
    cache: dict = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    stamps, todo = {}, []
    for path in files:
        st = path.stat()
        stamps[path] = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cache.get(str(path.resolve()))
        if not (hit and hit.get("stamp") == stamps[path]):
            todo.append(path)
    if todo:
        log.info("hashing %d source files (%.1f MB)", len(todo), sum(s[0] for p, s in stamps.items() if p in todo) / 1e6)
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
            for path, digest in zip(todo, pool.map(sha256_file, todo)):  # hashlib releases the GIL
                cache[str(path.resolve())] = {"stamp": stamps[path], "sha256": digest}
    out = {path.name: cache[str(path.resolve())]["sha256"] for path in files}
    changed = bool(todo)
    if cache_path is not None and changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError as e:  # the cache is an optimisation only
            log.warning("cannot write source hash cache %s: %s", cache_path, e)
    return out
