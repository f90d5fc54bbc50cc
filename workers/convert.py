"""Convert a Hugging Face safetensors checkpoint into per-rank TP/PP shards, streaming and atomically.

Each shard (docs/ARCHITECTURE.md, "Converted shard directory") is written row chunk by row chunk:
the safetensors header is computed from the layout up front, then every tensor's bytes are
streamed into the file, so peak memory is a few chunks (CHUNK_BYTES), not the model or even the
largest tensor. A shard is built in a hidden temp dir beside its final place, fsynced, given its
manifest last and renamed into place; a shard dir exists under its final name only when complete.
Reruns skip shards whose manifest matches the source hashes, layout, dtype and converter version.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from orchestrator.errors import CheckpointError, PlanError, RuntimeFailure
from workers.checkpoint import Checkpoint, TensorInfo, hash_sources, open_checkpoint, read_header, read_rows
from workers.layout import ShardTensor, check_parallelism, shard_tensors, source_shape, stage_layers
from workers.models.config import ModelConfig

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
FORMAT = "orch-shard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CHUNK_BYTES = 16 * 1024 * 1024  # rows read, converted and written per step (float32-equivalent bytes)
HASH_CACHE = ".source-hashes.json"
DELAY_ENV = "ORCH_CONVERT_TEST_DELAY_S"  # test hook: seconds to sleep after each chunk written

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_CODES = {  # torch dtype <-> safetensors dtype code
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_TORCH = {v: k for k, v in ST_CODES.items()}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# --- quantization hook ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """One tensor a transform writes into the shard."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class Transform(Protocol):
    """Turns each shard tensor into the tensors written to disk (cast; later: quantize).

    `apply` is called with consecutive row chunks (dim 0) of a shard tensor and returns, for every
    output of `outputs`, the matching rows; so a transform must be row-local (per-row scales are,
    a per-tensor amax is not: such a transform would set row_local=False to get whole tensors)."""

    name: str
    row_local: bool

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[OutTensor]: ...

    def apply(self, name: str, rows: torch.Tensor) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class CastTransform:
    """quantization 'none': every tensor cast to the target dtype."""

    dtype: torch.dtype
    name: str = "none"
    row_local: bool = True

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[OutTensor]:
        return [OutTensor(name, shape, self.dtype)]

    def apply(self, name: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: rows.to(self.dtype)}


QUANTIZATIONS: dict[str, Callable[[torch.dtype], Transform]] = {"none": CastTransform}


def get_transform(quantization: str, dtype: torch.dtype) -> Transform:
    """The conversion-time transform for build.quantization (only 'none' exists yet)."""
    if quantization not in QUANTIZATIONS:
        raise PlanError(
            f"build.quantization={quantization!r} is not yet supported by the converter "
            f"(supported: {', '.join(QUANTIZATIONS)})"
        )
    return QUANTIZATIONS[quantization](dtype)


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    """Target torch dtype for 'float32' | 'float16' | 'bfloat16' | 'auto' (config.json's torch_dtype)."""
    name = cfg.torch_dtype if dtype == "auto" else dtype
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}.get(name, name)
    if name not in TORCH_DTYPES:
        raise PlanError(f"model.dtype={dtype!r} is not supported (expected one of: auto, {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


# --- paths ---------------------------------------------------------------------------------------

def layout_dir(root: Path | str, tp: int, pp: int) -> Path:
    return Path(root) / f"tp{tp}-pp{pp}"


def shard_dir_for(root: Path | str, tp: int, pp: int, tp_rank: int, pp_rank: int) -> Path:
    """<root>/tp{T}-pp{P}/rank-{tp_rank}-{pp_rank}."""
    return layout_dir(root, tp, pp) / f"rank-{tp_rank}-{pp_rank}"


def source_key(source_hashes: dict[str, str]) -> str:
    """16 hex digits naming a checkpoint's content for this converter version."""
    blob = json.dumps({"converter_version": CONVERTER_VERSION, "sources": source_hashes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shards_root(artifacts: Path | str, model_dir: Path | str) -> Path:
    """<artifacts>/shards/<key>: where the shards of this checkpoint (any layout) live."""
    shards = Path(artifacts) / "shards"
    ckpt = open_checkpoint(model_dir)
    return shards / source_key(hash_sources(ckpt.source_files(), shards / HASH_CACHE))


# --- planning a shard ----------------------------------------------------------------------------

def _piece_len(p, src_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(src_shape)
    shape[p.dim] = p.stop - p.start
    return tuple(shape)


def shard_tensor_shape(cfg: ModelConfig, st: ShardTensor) -> tuple[int, ...]:
    """Shape of a shard tensor (pieces concatenated, then vocab padding)."""
    if not st.pieces:
        return (st.pad_to or 0, cfg.hidden_size)
    shapes = [_piece_len(p, source_shape(cfg, p.source)) for p in st.pieces]
    out = list(shapes[0])
    out[st.concat_dim] = sum(s[st.concat_dim] for s in shapes)
    if st.pad_to is not None:
        out[0] = st.pad_to
    return tuple(out)


@dataclass
class ShardPlan:
    """Everything needed to write (or check) one rank's shard."""

    tp_rank: int
    pp_rank: int
    tensors: list[tuple[ShardTensor, tuple[int, ...]]]
    outputs: list[OutTensor]
    header: bytes  # the full safetensors prefix: 8-byte length + padded JSON header
    offsets: dict[str, tuple[int, int]]  # output name -> absolute byte range in the file

    @property
    def file_size(self) -> int:
        return max((b for _, b in self.offsets.values()), default=len(self.header))

    @property
    def data_bytes(self) -> int:
        return self.file_size - len(self.header)


def safetensors_header(outputs: list[OutTensor]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors file prefix (8-byte length + JSON padded to 8) for tensors stored in order,
    and each tensor's absolute byte range in the file."""
    meta: dict = {"__metadata__": {"format": "pt", "producer": f"orch-convert/{CONVERTER_VERSION}"}}
    pos, rel = 0, {}
    for o in outputs:
        n = o.dtype.itemsize
        for d in o.shape:
            n *= d
        meta[o.name] = {"dtype": ST_CODES[o.dtype], "shape": list(o.shape), "data_offsets": [pos, pos + n]}
        rel[o.name] = (pos, pos + n)
        pos += n
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    header = struct.pack("<Q", len(js)) + js
    return header, {k: (a + len(header), b + len(header)) for k, (a, b) in rel.items()}


def plan_shard(cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int, transform: Transform) -> ShardPlan:
    """Lay out one shard's file: tensor order, shapes, dtypes and byte offsets."""
    tensors = [(st, shard_tensor_shape(cfg, st)) for st in shard_tensors(cfg, tp, pp, tp_rank, pp_rank)]
    outputs = [o for st, shape in tensors for o in transform.outputs(st.name, shape)]
    header, offsets = safetensors_header(outputs)
    return ShardPlan(tp_rank, pp_rank, tensors, outputs, header, offsets)


# --- streaming the rows of one shard tensor ------------------------------------------------------

def _piece_index(p, ndim: int, lo: int, hi: int) -> tuple[slice, ...]:
    """Index of rows [lo, hi) (piece-local) of piece p inside its source tensor."""
    idx = [slice(None)] * ndim
    idx[0] = slice(p.start + lo, p.start + hi) if p.dim == 0 else slice(lo, hi)
    if p.dim != 0:
        idx[p.dim] = slice(p.start, p.stop)
    return tuple(idx)


def _common(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    dts = {t.dtype for t in parts}
    return parts if len(dts) <= 1 else [t.to(torch.float32) for t in parts]


def iter_rows(ckpt: Checkpoint, st: ShardTensor, shape: tuple[int, ...], chunk_rows: int) -> Iterator[torch.Tensor]:
    """Yield the shard tensor in consecutive dim-0 chunks, reading only the needed source slices."""
    infos: list[TensorInfo] = [ckpt.tensors[p.source] for p in st.pieces]
    if st.concat_dim == 0:
        spans, row = [], 0
        for p, info in zip(st.pieces, infos):
            n = p.stop - p.start if p.dim == 0 else info.shape[0]
            spans.append((row, row + n))
            row += n
        real = row
    else:
        real = shape[0] if not infos else (
            st.pieces[0].stop - st.pieces[0].start if st.pieces[0].dim == 0 else infos[0].shape[0])
    fill_dtype = ST_TO_TORCH[infos[0].dtype] if infos else torch.float32
    for r0 in range(0, shape[0], chunk_rows):
        r1 = min(shape[0], r0 + chunk_rows)
        parts: list[torch.Tensor] = []
        if r0 < real:
            hi = min(r1, real)
            if st.concat_dim == 0:
                for p, info, (a, b) in zip(st.pieces, infos, spans):
                    if a < hi and b > r0:
                        parts.append(read_rows(info, _piece_index(p, len(info.shape), max(r0, a) - a, min(hi, b) - a)))
            else:
                cols = [read_rows(info, _piece_index(p, len(info.shape), r0, hi)) for p, info in zip(st.pieces, infos)]
                parts.append(torch.cat(_common(cols), dim=st.concat_dim) if len(cols) > 1 else cols[0])
        if r1 > real:
            parts.append(torch.zeros((r1 - max(r0, real), *shape[1:]), dtype=fill_dtype))
        parts = _common(parts)
        yield torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# --- writing --------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class _Progress:
    """Optional rich progress over tensors and bytes."""

    def __init__(self, enabled: bool, total_tensors: int, total_bytes: int):
        self.enabled, self.totals = enabled, (total_tensors, total_bytes)
        self.done = [0, 0]
        self._bar, self._tasks, self._t0 = None, (), time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
            self._bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._bar.__enter__()
            self._tasks = (self._bar.add_task("tensors", total=self.totals[0], detail=""),
                           self._bar.add_task("bytes", total=self.totals[1], detail=""))
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, tensors: int = 0, nbytes: int = 0) -> None:
        self.done[0] += tensors
        self.done[1] += nbytes
        if self._bar is not None:
            rate = self.done[1] / max(1e-9, time.perf_counter() - self._t0)
            self._bar.update(self._tasks[0], completed=self.done[0], detail=f"{self.done[0]}/{self.totals[0]}")
            self._bar.update(self._tasks[1], completed=self.done[1],
                             detail=f"{self.done[1] / 1e6:.1f}/{self.totals[1] / 1e6:.1f} MB {rate / 1e6:.0f} MB/s")


def _write_weights(path: Path, ckpt: Checkpoint, plan: ShardPlan, transform: Transform,
                   progress: _Progress) -> dict[str, dict]:
    """Stream one shard's safetensors file; returns {name: {shape, dtype, sha256}}."""
    delay = float(os.environ.get(DELAY_ENV) or 0)
    hashes = {o.name: hashlib.sha256() for o in plan.outputs}
    cursor = {o.name: plan.offsets[o.name][0] for o in plan.outputs}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    pool = ThreadPoolExecutor(max_workers=2)
    pending: list = []  # the previous chunk's write and hash, running while the next chunk is read

    def drain() -> None:
        for fut in pending:
            fut.result()
        pending.clear()

    try:
        try:
            os.posix_fallocate(fd, 0, plan.file_size)  # fail now, not half-way, when the disk is full
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
        _pwrite_all(fd, memoryview(plan.header), 0)
        for st, shape in plan.tensors:
            row_elems = 1
            for d in shape[1:]:
                row_elems *= d
            chunk_rows = max(1, CHUNK_BYTES // (4 * max(1, row_elems))) if transform.row_local else max(1, shape[0])
            for rows in iter_rows(ckpt, st, shape, chunk_rows):
                outs = transform.apply(st.name, rows)
                drain()
                for name, t in outs.items():
                    buf = _bytes(t)
                    pending.append(pool.submit(_pwrite_all, fd, buf, cursor[name]))
                    pending.append(pool.submit(hashes[name].update, buf))
                    cursor[name] += len(buf)
                    progress.advance(nbytes=len(buf))
                if delay:
                    time.sleep(delay)
            drain()
            progress.advance(tensors=1)
        for name, (_, end) in plan.offsets.items():
            if cursor[name] != end:
                raise RuntimeFailure(f"converter bug: {name} wrote {cursor[name]} bytes, expected end {end}")
        os.fsync(fd)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        os.close(fd)
    return {o.name: {"shape": list(o.shape), "dtype": dtype_name(o.dtype), "sha256": hashes[o.name].hexdigest()}
            for o in plan.outputs}


def content_hash(header: bytes, tensors: dict[str, dict]) -> str:
    """sha256 over the safetensors header followed by each tensor's sha256 hex digest in file order."""
    h = hashlib.sha256(header)
    for meta in tensors.values():
        h.update(meta["sha256"].encode())
    return h.hexdigest()


def _manifest_head(cfg: ModelConfig, tp: int, pp: int, plan: ShardPlan, dtype: torch.dtype,
                   transform: Transform, sources: dict[str, str]) -> dict:
    start, stop = stage_layers(cfg.num_layers, pp)[plan.pp_rank]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "converter_version": CONVERTER_VERSION,
        "model_config": cfg.to_dict(), "tp_size": tp, "pp_size": pp, "tp_rank": plan.tp_rank,
        "pp_rank": plan.pp_rank, "layer_start": start, "layer_stop": stop, "dtype": dtype_name(dtype),
        "quantization": transform.name, "source_files": dict(sorted(sources.items())),
    }


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_shard(target: Path, ckpt: Checkpoint, plan: ShardPlan, head: dict, transform: Transform,
                 progress: _Progress) -> None:
    """Build one shard in a temp dir beside target, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    trash = None
    try:
        os.chmod(tmp, 0o755)
        tensors = _write_weights(tmp / WEIGHTS, ckpt, plan, transform, progress)
        for src in ckpt.tokenizer_files():
            shutil.copyfile(src, tmp / src.name)
            with open(tmp / src.name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {**head, "tensors": tensors, "content_hash": content_hash(plan.header, tensors)}
        _write_file_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if target.exists():  # an invalid or outdated shard: move it aside, then replace
            trash = target.parent / f".{target.name}.old.{os.getpid()}"
            os.replace(target, trash)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise RuntimeFailure(
                f"no space left on device writing shard {target} ({plan.file_size / 1e6:.1f} MB needed); "
                "free space and rerun (completed shards are kept)"
            ) from None
        raise RuntimeFailure(f"cannot write shard {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


# --- reading and verifying shards ----------------------------------------------------------------

_MANIFEST_KEYS = ("format", "format_version", "converter_version", "model_config", "tp_size", "pp_size",
                  "tp_rank", "pp_rank", "layer_start", "layer_stop", "dtype", "quantization",
                  "source_files", "tensors", "content_hash")


def read_shard_manifest(shard_dir: Path | str) -> dict:
    """Load and check a shard's manifest against its safetensors header (names, shapes, dtypes, size)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{shard_dir}: not a converted shard (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read shard manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest")
    missing = [k for k in _MANIFEST_KEYS if k not in m]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {', '.join(missing)}")
    header, _ = read_header(shard_dir / WEIGHTS)
    header.pop("__metadata__", None)
    got = {k: (v["shape"], v["dtype"]) for k, v in header.items()}
    want = {k: (v["shape"], ST_CODES[getattr(torch, v["dtype"])]) for k, v in m["tensors"].items()}
    if got != want:
        raise CheckpointError(f"{shard_dir / WEIGHTS}: tensors do not match {path}")
    size = (shard_dir / WEIGHTS).stat().st_size
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    hlen = struct.unpack("<Q", (shard_dir / WEIGHTS).open("rb").read(8))[0]
    if size != 8 + hlen + end:
        raise CheckpointError(f"{shard_dir / WEIGHTS}: size {size} does not match its header ({8 + hlen + end})")
    return m


def verify_shard(shard_dir: Path | str) -> dict:
    """read_shard_manifest plus a full re-hash of every tensor and the content hash."""
    shard_dir = Path(shard_dir)
    m = read_shard_manifest(shard_dir)
    path = shard_dir / WEIGHTS
    header, data_start = read_header(path)
    header.pop("__metadata__", None)
    with open(path, "rb") as f:
        prefix = f.read(data_start)
        for name, meta in m["tensors"].items():
            a, b = header[name]["data_offsets"]
            f.seek(data_start + a)
            h, left = hashlib.sha256(), b - a
            while left:
                chunk = f.read(min(left, 8 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{path}: tensor '{name}' does not match its sha256 in the manifest")
    if content_hash(prefix, m["tensors"]) != m["content_hash"]:
        raise CheckpointError(f"{path}: content hash does not match the manifest")
    return m


def _is_current(target: Path, head: dict, plan: ShardPlan, deep: bool) -> bool:
    """True when target is a valid shard made from the same sources, layout, dtype and converter."""
    if not target.is_dir():
        return False
    try:
        m = verify_shard(target) if deep else read_shard_manifest(target)
    except CheckpointError as e:
        log.warning("%s is not a valid shard (%s); reconverting it", target, e)
        return False
    if any(m.get(k) != v for k, v in head.items()):
        return False
    want = {o.name: [list(o.shape), dtype_name(o.dtype)] for o in plan.outputs}
    return {k: [v["shape"], v["dtype"]] for k, v in m["tensors"].items()} == want


# --- the conversion ------------------------------------------------------------------------------

class ConvertResult(list):
    """The shard dirs of the layout (a list of Path), plus what this run converted or reused."""

    def __init__(self, shards: list[Path], converted: list[Path], reused: list[Path], seconds: float, nbytes: int):
        super().__init__(shards)
        self.converted, self.reused, self.seconds, self.bytes_written = converted, reused, seconds, nbytes

    @property
    def noop(self) -> bool:
        return not self.converted


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on <root>/.lock so two converters never write the same shards."""
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RuntimeFailure(f"cannot lock shard directory {root}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another conversion into %s", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_stale(layout: Path) -> None:
    """Remove temp and replaced dirs left by a killed conversion (we hold the lock)."""
    for p in layout.glob(".rank-*"):
        if ".tmp." in p.name or ".old." in p.name:
            log.info("removing leftover %s from an interrupted conversion", p)
            shutil.rmtree(p, ignore_errors=True)


def _fixed_mmap_threshold() -> None:
    """Make glibc serve our 1 MiB+ chunk buffers with mmap and give them back on free.

    By default glibc raises its mmap threshold after each large free, so later chunk-sized buffers
    come from the heap and fragment it: RSS then creeps up by tens of MB per shard. Best effort."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _check_space(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if need > free:
        raise RuntimeFailure(
            f"no space left on device for shards in {root}: need {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )


def convert_checkpoint(model_dir: Path | str, out_root: Path | str, tp: int, pp: int, dtype: str = "float32",
                       progress: bool = False, *, quantization: str = "none", force: bool = False,
                       verify: bool = False, hash_cache: Path | None = None,
                       on_shard: Callable[[Path, int, int], None] | None = None) -> ConvertResult:
    """Write every (tp_rank, pp_rank) shard of checkpoint model_dir under out_root; skip current ones.

    force: reconvert even valid shards. verify: re-hash existing shards instead of the cheap check.
    hash_cache: where source sha256s are cached (default: .source-hashes.json beside out_root, which is
    <artifacts>/shards/.source-hashes.json for out_root = shards_root(artifacts, model_dir)).
    on_shard(shard_dir, done, total): called after each shard this run writes (progress for callers)."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir)
    cfg = ckpt.config
    check_parallelism(cfg, tp, pp)
    target_dtype = resolve_dtype(dtype, cfg)
    transform = get_transform(quantization, target_dtype)
    out_root = Path(out_root)
    layout = layout_dir(out_root, tp, pp)
    try:
        layout.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeFailure(f"cannot create shard directory {layout}: {e.strerror or e}") from None
    with _locked(out_root):
        _clean_stale(layout)
        sources = hash_sources(ckpt.source_files(), hash_cache or out_root.parent / HASH_CACHE)
        plans = [plan_shard(cfg, tp, pp, t, p, transform) for p in range(pp) for t in range(tp)]
        heads = [_manifest_head(cfg, tp, pp, pl, target_dtype, transform, sources) for pl in plans]
        dirs = [shard_dir_for(out_root, tp, pp, pl.tp_rank, pl.pp_rank) for pl in plans]
        todo = [i for i in range(len(plans)) if force or not _is_current(dirs[i], heads[i], plans[i], verify)]
        reused = [dirs[i] for i in range(len(plans)) if i not in todo]
        if not todo:
            log.info("all %d shards of tp%d-pp%d in %s are up to date; nothing to convert", len(plans), tp, pp, out_root)
            return ConvertResult(dirs, [], reused, time.perf_counter() - t0, 0)
        need = sum(plans[i].file_size for i in todo)
        _check_space(layout, need)
        _fixed_mmap_threshold()
        log.info("converting %d of %d shards (tp=%d, pp=%d, %s, %.1f MB) into %s",
                 len(todo), len(plans), tp, pp, dtype_name(target_dtype), need / 1e6, layout)
        n_tensors = sum(len(plans[i].tensors) for i in todo)
        with _Progress(progress, n_tensors, sum(plans[i].data_bytes for i in todo)) as bar:
            for n, i in enumerate(todo, 1):
                _write_shard(dirs[i], ckpt, plans[i], heads[i], transform, bar)
                log.debug("wrote %s", dirs[i])
                if on_shard is not None:
                    on_shard(dirs[i], n, len(todo))
    dt = time.perf_counter() - t0
    log.info("converted %d shards (%.1f MB) in %.1f s", len(todo), need / 1e6, dt)
    return ConvertResult(dirs, [dirs[i] for i in todo], reused, dt, need)


def prune_layouts(out_root: Path | str, keep: tuple[int, int]) -> list[Path]:
    """Delete every tp*-pp* layout under out_root except keep=(tp, pp); returns what was removed."""
    out_root = Path(out_root)
    removed = []
    with _locked(out_root):
        for d in sorted(out_root.glob("tp*-pp*")):
            if d.is_dir() and d != layout_dir(out_root, *keep):
                shutil.rmtree(d)
                removed.append(d)
    return removed


# --- reassembly (tests, debugging) ---------------------------------------------------------------

def reassemble(out_root: Path | str, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Rebuild the checkpoint's tensors (HF names) from a layout's shards; replicated copies must agree
    and vocab padding must be zero. Loads whole shards: for tests and small models."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}  # which elements of each source some shard has filled
    for p in range(pp):
        for t in range(tp):
            d = shard_dir_for(out_root, tp, pp, t, p)
            m = read_shard_manifest(d)
            cfg = ModelConfig.from_dict(m["model_config"])
            data = load_file(str(d / WEIGHTS))
            for st in shard_tensors(cfg, tp, pp, t, p):
                x = data[st.name]
                pos = 0
                for piece in st.pieces:
                    full = source_shape(cfg, piece.source)
                    n = piece.stop - piece.start if piece.dim == st.concat_dim else full[st.concat_dim]
                    part = x.narrow(st.concat_dim, pos, n)
                    pos += n
                    dst = out.setdefault(piece.source, torch.zeros(full, dtype=x.dtype))
                    mask = seen.setdefault(piece.source, torch.zeros(full, dtype=torch.bool))
                    view = dst.narrow(piece.dim, piece.start, piece.stop - piece.start)
                    had = mask.narrow(piece.dim, piece.start, piece.stop - piece.start)
                    if had.any() and not torch.equal(view[had], part[had]):
                        raise CheckpointError(f"{d}: replicated copy of {piece.source} differs from another rank's")
                    view.copy_(part)
                    had.fill_(True)
                if st.pad_to is not None and x.shape[0] > pos and torch.count_nonzero(x[pos:]):
                    raise CheckpointError(f"{d}: vocab padding rows of {st.name} are not zero")
    for name, mask in seen.items():
        if not bool(mask.all()):
            raise CheckpointError(f"{out_root}: no shard holds all of {name}")
    return out
