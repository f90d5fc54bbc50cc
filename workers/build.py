"""Engine build: per converted shard, on the GPU that will serve it, NVRTC-compile the kernels for its
architecture, tune launch choices for the model's shapes, and write an engine directory atomically.

An engine directory is a shard directory (its files hard-linked: the kernels use the shard's layout
as it is) plus `engine.json` (manifest pinning GPU and software stack), `tuning.json` and
`kernels/*.cubin`. `Engine(engine_dir, device="cuda")` loads it like a shard; `load_engine` checks
the pins first. Builds are cached by a key over the shard's content hash, the stack and the kernel
sources: an unchanged build returns the existing directory. Batch size, sequence length and
KV-cache size are runtime settings and take no part in a build.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import EngineMismatchError
from workers.fsutil import atomic_dir

log = logging.getLogger(__name__)

ENGINE_FORMAT = "orch-engine"
ENGINE_FORMAT_VERSION = 1
BUILDER_VERSION = "1"
ENGINE_MANIFEST = "engine.json"
TUNING_FILE = "tuning.json"
KERNELS = "kernels"
PINNED = ("gpu_name", "arch", "cuda_runtime", "cuda_driver", "nvrtc", "cupy", "torch", "orch")
TUNE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TUNE_CONTEXTS = (256, 2048)


# --- what an engine is pinned to ----------------------------------------------------------------------

def _version(code: int) -> str:
    """CUDA's integer version (13000) as '13.0'."""
    return f"{code // 1000}.{code % 1000 // 10}"


def orch_version() -> str:
    """The installed orch package version (0+unknown when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orch")
    except PackageNotFoundError:
        return "0+unknown"


def environment(device: Any = None) -> dict[str, str]:
    """The GPU and software stack an engine built here is pinned to."""
    import cupy
    import torch

    from workers.kernels._nvrtc import arch, nvrtc_version

    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return {"gpu_name": torch.cuda.get_device_name(dev), "arch": arch(dev),
            "cuda_runtime": _version(cupy.cuda.runtime.runtimeGetVersion()),
            "cuda_driver": _version(cupy.cuda.runtime.driverGetVersion()),
            "nvrtc": nvrtc_version(), "cupy": cupy.__version__, "torch": torch.__version__, "orch": orch_version()}


def mismatches(pinned: dict[str, str], current: dict[str, str]) -> list[str]:
    """'key: built for X, this worker has Y' for every pinned field that differs."""
    return [f"{k}: built for {pinned.get(k)!r}, this worker has {current.get(k)!r}"
            for k in PINNED if pinned.get(k) != current.get(k)]


def mismatch_message(engine_dir: Path | str, pinned: dict[str, Any], current: dict[str, str]) -> str:
    """The EngineMismatchError text: what differs and how to rebuild."""
    diffs = mismatches(pinned, current)
    src = pinned.get("shard_dir", "<shard dir>")
    return (f"{Path(engine_dir) / ENGINE_MANIFEST}: engine does not match this worker ({'; '.join(diffs)}); "
            f"rebuild it here with `orch build <topology.yaml>` (builds from {src}) or let `orch apply` rebuild it")


# --- build key and the kernels a model needs -----------------------------------------------------------

def kernel_specs(model_config: dict, tp: int, dtype: str, sm: str | None = None) -> list[Any]:
    """The kernel variants a shard of this model runs on an `sm` GPU (module specs of
    workers.kernels._nvrtc; the architecture-specific ones only where `sm` names their architecture)."""
    from workers.convert import TORCH_DTYPES
    from workers.kernels.gemv import VARIANTS as GEMV_VARIANTS
    from workers.kernels.paged_attention import STAGE_CHOICES
    from workers.kernels.paged_attention import module_spec as attn_spec
    from workers.kernels.skinny_gemm import module_specs as skinny_specs
    from workers.kernels.tma_gemm import module_specs as tma_specs
    from workers.kernels.stream_gemv import module_specs as stream_specs
    from workers.kernels._nvrtc import spec
    from workers.layout import local_heads
    from workers.models.config import ModelConfig

    cfg = ModelConfig.from_dict(model_config)
    dt = TORCH_DTYPES[dtype]
    q, kv = local_heads(cfg, tp, 0)
    specs = [spec("rms_norm", dt), spec("silu_mul", dt), spec("rope_cache", dt),
             *(spec("gemv", dt, ROWS=r, UNROLL=u) for r, u in GEMV_VARIANTS),
             *(tma_specs(dt, sm) or skinny_specs(dt)),   # tma_gemm where the GPU has it, else skinny_gemm
             *stream_specs(dt, sm)]
    if cfg.head_dim % 8 == 0:
        specs += sorted({attn_spec(dt, cfg.head_dim, len(q) // len(kv), st) for st in STAGE_CHOICES},
                        key=lambda s: s.defines)
    return specs


def sources_hash(specs: list[Any]) -> str:
    """sha256 over the full source text of each kernel variant."""
    h = hashlib.sha256()
    for s in specs:
        h.update(s.source().encode())
    return h.hexdigest()


def build_key(shard_manifest: dict, env: dict[str, str], src_hash: str) -> str:
    """The content key of a build: same shard, stack and kernel sources -> same engine."""
    blob = json.dumps({"shard": shard_manifest["content_hash"], "env": {k: env[k] for k in PINNED},
                       "kernels": src_hash, "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_engine_manifest(engine_dir: Path | str) -> dict | None:
    """engine.json of an engine directory, or None when the directory is a plain shard."""
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineMismatchError(f"{path}: unreadable engine manifest ({e}); delete the directory and rebuild") from None
    if m.get("format") != ENGINE_FORMAT or m.get("format_version") != ENGINE_FORMAT_VERSION:
        raise EngineMismatchError(f"{path}: not an {ENGINE_FORMAT} v{ENGINE_FORMAT_VERSION} manifest; rebuild it")
    return m


# --- building -------------------------------------------------------------------------------------------

def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy across file systems) every file of the shard directory into dst."""
    for f in src.iterdir():
        if f.is_file() and f.name != ENGINE_MANIFEST:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_engine(shard_dir: Path | str, engines_root: Path | str, *, force: bool = False, tune: bool = True,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the engine of one shard for the current GPU; returns the engine directory."""
    import torch

    from workers.convert import read_shard_manifest
    from workers.kernels import _nvrtc

    t0 = time.perf_counter()
    say = progress or (lambda msg: log.info("%s", msg))
    if not torch.cuda.is_available():
        raise EngineMismatchError(f"{shard_dir}: building an engine needs a CUDA GPU on this worker (none found)")
    shard_dir = Path(shard_dir)
    sm = read_shard_manifest(shard_dir)
    env = environment()
    specs = kernel_specs(sm["model_config"], sm["tp_size"], sm["dtype"], env["arch"])
    key = build_key(sm, env, sources_hash(specs))
    target = Path(engines_root) / f"{key[:24]}"
    existing = None if force else read_engine_manifest(target) if target.is_dir() else None
    if existing is not None and existing.get("build_key") == key:
        say(f"engine up to date: {target}")
        return target
    with atomic_dir(target) as tmp:
        (tmp / KERNELS).mkdir()
        _link_tree(shard_dir, tmp)
        t_compile = time.perf_counter()
        kernels = {}
        for s in specs:
            name = s.filename(env["arch"])
            (tmp / KERNELS / name).write_bytes(_nvrtc.compile_cubin(s, env["arch"]))
            kernels[name] = {"family": s.family, "defines": dict(s.defines),
                             "sha256": _sha256_file(tmp / KERNELS / name)}
        say(f"compiled {len(kernels)} kernel modules for {env['arch']} in {time.perf_counter() - t_compile:.1f} s")
        _nvrtc.register_prebuilt(tmp / KERNELS)
        t_tune = time.perf_counter()
        from workers.kernels.autotune import tune_shard

        table = tune_shard(sm, specs) if tune else None
        (tmp / TUNING_FILE).write_text(json.dumps(table.to_dict() if table else {}, indent=1))
        say(f"tuned launch choices in {time.perf_counter() - t_tune:.1f} s")
        manifest = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
                    "builder_version": BUILDER_VERSION, "build_key": key, **env,
                    "shard_dir": str(shard_dir.resolve()), "shard_content_hash": sm["content_hash"],
                    "tp_size": sm["tp_size"], "pp_size": sm["pp_size"], "tp_rank": sm["tp_rank"],
                    "pp_rank": sm["pp_rank"], "dtype": sm["dtype"], "kernels": kernels, "tuning": TUNING_FILE,
                    "build_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=1))
    _nvrtc.register_prebuilt(target / KERNELS)
    say(f"engine built in {time.perf_counter() - t0:.1f} s: {target}")
    return target


# --- loading --------------------------------------------------------------------------------------------

def load_engine(rank_dir: Path | str, dist: Any = None) -> dict | None:
    """Before a GPU engine starts: check an engine directory's pins against this worker (and, with a
    process group, that every rank runs the same stack), then use its cubins and tuning table.
    A plain shard directory (no engine.json) runs with kernels compiled on first use and default tuning."""
    from workers.kernels import _nvrtc, tuning

    rank_dir = Path(rank_dir)
    m = read_engine_manifest(rank_dir)
    env = environment()
    if dist is not None and getattr(dist, "world_size", 1) > 1:
        check_mesh(env, dist)
    if m is None:
        tuning.set_current(tuning.Tuning())
        return None
    if mismatches(m, env):
        raise EngineMismatchError(mismatch_message(rank_dir, m, env))
    _nvrtc.register_prebuilt(rank_dir / KERNELS)
    table = tuning.Tuning.from_dict(json.loads((rank_dir / m.get("tuning", TUNING_FILE)).read_text() or "{}"))
    if table.lt:   # its handle and workspace now, before the decode graphs are captured
        import torch

        from workers.kernels import cublaslt
        cublaslt.prepare(torch.cuda.current_device())
    tuning.set_current(table)
    return m


def check_mesh(env: dict[str, str], dist: Any) -> None:
    """Refuse a mesh whose ranks run different GPUs or stacks (collective over all ranks)."""
    import torch.distributed as tdist

    envs: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(envs, env, group=getattr(dist, "control_group", None))  # gloo beside NCCL
    first = envs[0]
    for rank, e in enumerate(envs):
        diffs = [f"{k}: rank 0 has {first.get(k)!r}, rank {rank} has {e.get(k)!r}"
                 for k in PINNED if e.get(k) != first.get(k)]
        if diffs:
            raise EngineMismatchError("mixed mesh refused: " + "; ".join(diffs)
                                      + " (every rank must run the same GPU model and software stack)")
