"""Compile kernel families with NVRTC for this GPU's architecture, cache the cubins, launch on torch's stream."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPTIONS = ("-std=c++17",)
ARCH_SPECIFIC = frozenset({"tma_gemm"})   # families that use sm_90a-only instructions (wgmma): compiled for "sm_90a"

_lock = threading.Lock()
_modules: dict[tuple[str, int], Any] = {}  # (cubin file name, device) -> loaded cupy Module
_prebuilt: list[Path] = []              # engine kernel directories searched before compiling


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source (the message holds its log)."""


def arch(device: torch.device | int | None = None) -> str:
    """The real architecture name of a CUDA device, e.g. 'sm_90'."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def nvrtc_version() -> str:
    """NVRTC's version, 'major.minor'."""
    from cupy.cuda import nvrtc

    return ".".join(str(v) for v in nvrtc.getVersion())


def cache_dir() -> Path:
    """Where compiled cubins are kept between processes ($ORCH_KERNEL_CACHE or ~/.cache/orch/kernels)."""
    return Path(os.environ.get("ORCH_KERNEL_CACHE", Path.home() / ".cache" / "orch" / "kernels"))


@dataclass(frozen=True)
class ModuleSpec:
    """One compiled variant of a kernel family: `<family>.cu` with compile-time defines."""

    family: str
    defines: tuple[tuple[str, int], ...]

    def source(self) -> str:
        head = "".join(f"#define {k} {v}\n" for k, v in self.defines)
        return head + _read("_prelude.cu") + _read(f"{self.family}.cu")

    def filename(self, sm: str) -> str:
        return _filename(self, sm)


@functools.lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


@functools.lru_cache(maxsize=None)
def _filename(s: ModuleSpec, sm: str) -> str:
    sm = target(s, sm)
    h = hashlib.sha256("\0".join([s.source(), sm, nvrtc_version(), *OPTIONS]).encode()).hexdigest()
    return f"{s.family}-{sm}-{h[:16]}.cubin"


def spec(family: str, dtype: torch.dtype, **defines: int) -> ModuleSpec:
    """The variant of `family` for an element type and extra defines."""
    return ModuleSpec(family, (("DTYPE", DTYPE_IDS[dtype]), *sorted(defines.items())))


def target(s: ModuleSpec, sm: str) -> str:
    """The architecture a variant compiles for on an `sm` GPU: `sm` itself, or its arch-specific form
    ("sm_90a") for the families that use instructions only that architecture has."""
    return f"{sm}a" if s.family in ARCH_SPECIFIC and not sm.endswith("a") else sm


def compile_cubin(s: ModuleSpec, sm: str) -> bytes:
    """NVRTC-compile a module variant to a cubin for architecture `sm` (see `target`)."""
    from cupy.cuda import nvrtc

    sm = target(s, sm)
    prog = nvrtc.createProgram(s.source(), f"{s.family}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={sm}", *OPTIONS])
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(f"{s.family}.cu {dict(s.defines)} for {sm}: {e}\n"
                                     f"{nvrtc.getProgramLog(prog)}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def register_prebuilt(directory: Path | str) -> None:
    """Search `directory` (an engine's kernels/) for cubins before compiling."""
    d = Path(directory)
    with _lock:
        if d not in _prebuilt:
            _prebuilt.insert(0, d)


def cubin_path(s: ModuleSpec, sm: str | None = None, compile_missing: bool = True) -> Path:
    """The cubin file of a variant: a prebuilt one, a cached one, or freshly compiled into the cache."""
    sm = sm or arch()
    name = s.filename(sm)
    for d in [*_prebuilt, cache_dir()]:
        if (d / name).is_file():
            return d / name
    if not compile_missing:
        raise FileNotFoundError(name)
    out = cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(compile_cubin(s, sm))
    os.replace(tmp, out)
    log.debug("compiled %s", name)
    return out


def function(s: ModuleSpec, name: str) -> Any:
    """A kernel function of a variant, loaded into the current CUDA context (compiled on first use)."""
    return _function(s, name, torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _function(s: ModuleSpec, name: str, device: int) -> Any:
    sm = arch(device)
    key = (s.filename(sm), device)
    mod = _modules.get(key)
    if mod is None:
        from cupy.cuda import function as cufn

        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cufn.Module()
                mod.load_file(str(cubin_path(s, sm)))  # the current device's context
                _modules[key] = mod
    return mod.get_function(name)


class _Stream:
    """The one attribute cupy's launcher reads from a stream object."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


def launch(fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0,
           cluster: tuple[int, int, int] | None = None) -> None:
    """Launch on torch's current stream (so it joins torch's ordering and CUDA graph capture), with
    programmatic dependent launch where the GPU has it (see _prelude.cu's pdl_start), in thread-block
    clusters of `cluster` blocks when given (sm_90+: check `clusters_supported`)."""
    device, stream = _current_stream()
    pdl = _pdl_enabled(device)
    if pdl or cluster:
        _launch_ex(fn, grid, block, args, shared_mem, stream, pdl, cluster)
    else:
        fn(grid, block, args, shared_mem, _Stream(stream))


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # absent: the public (slower) way


def _current_stream() -> tuple[int, int]:
    """(device index, raw handle of torch's current stream there): the cheap way, on every launch."""
    device = torch.cuda.current_device()
    return device, _RAW_STREAM(device) if _RAW_STREAM is not None else torch.cuda.current_stream(device).cuda_stream


# --- programmatic dependent launch through the driver's cuLaunchKernelEx ---------------------------------

_CLUSTER_DIMENSION = 4  # CUlaunchAttributeID
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


class TensorMapArg(bytes):
    """A CUtensorMap (128 bytes) passed by value, as a `const __grid_constant__` kernel argument."""


_ARG_CODES = {np.uint64: "Q", np.int64: "q", np.int32: "i", np.float32: "f",   # struct codes of kernel arguments
              TensorMapArg: "128s"}


@functools.lru_cache(maxsize=None)
def _arg_layout(types: tuple) -> tuple[struct.Struct, np.ndarray]:
    """Arguments of these types laid out as C lays them out (native alignment): a struct that packs them all
    into one buffer, and each one's offset in it."""
    codes = [_ARG_CODES[t] for t in types]
    offsets = [struct.calcsize("@" + "".join(codes[: i + 1])) - struct.calcsize("@" + c) for i, c in enumerate(codes)]
    return struct.Struct("@" + "".join(codes)), np.array(offsets, dtype=np.uint64)


def kernel_params(args: tuple) -> tuple[np.ndarray, Any]:
    """cuLaunchKernelEx's kernelParams for `args` (ptr / i32 / i64 / f32 values, tensor maps): an array of
    pointers to each value, and the buffer that holds the values; both must stay alive until the launch
    call returns (the driver copies each value to its offset in the kernel's parameters: the buffer needs
    no alignment). One pack per launch (a ctypes object per argument cost ~4x the host time)."""
    st, offsets = _arg_layout(tuple(map(type, args)))
    buf = ctypes.create_string_buffer(st.pack(*args), st.size)
    return offsets + np.uint64(ctypes.addressof(buf)), buf


@functools.lru_cache(maxsize=None)
def _driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,  # void **params
                                     ctypes.c_void_p]
    return lib


@functools.lru_cache(maxsize=None)
def _pdl_attr() -> Any:
    return _launch_attr(_PROGRAMMATIC_STREAM_SERIALIZATION, 1)   # programmaticStreamSerializationAllowed


def _launch_attr(attr_id: int, *values: int) -> _LaunchAttr:
    """A launch attribute whose value is these 32-bit integers. Copied in byte for byte: assigning bytes to
    the char-array field would stop at the first zero byte."""
    attr = _LaunchAttr()
    attr.id = attr_id
    raw = b"".join(int(v).to_bytes(4, "little") for v in values)
    ctypes.memmove(ctypes.addressof(attr) + _LaunchAttr.value.offset, raw, len(raw))
    return attr


@functools.lru_cache(maxsize=None)
def _cluster_attr(dims: tuple[int, int, int]) -> Any:
    return _launch_attr(_CLUSTER_DIMENSION, *dims)


@functools.lru_cache(maxsize=None)
def _attrs(pdl: bool, cluster: tuple[int, int, int] | None) -> tuple[Any, int]:
    """A launch's attribute array (built once per combination: kept alive by the cache) and its length."""
    chosen = ([_pdl_attr()] if pdl else []) + ([_cluster_attr(cluster)] if cluster else [])
    arr = (_LaunchAttr * max(1, len(chosen)))(*chosen)
    return ctypes.cast(arr, ctypes.POINTER(_LaunchAttr)), len(chosen)


@functools.lru_cache(maxsize=None)
def clusters_supported(device: int) -> bool:
    """Whether the launch attributes of sm_90+ (thread-block clusters, PDL) can be used here: an sm_90+ GPU
    and a driver with cuLaunchKernelEx."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        return hasattr(_driver(), "cuLaunchKernelEx")
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _pdl_enabled(device: int) -> bool:
    """PDL where `clusters_supported` (sm_90+, cuLaunchKernelEx) unless ORCH_PDL=0."""
    return os.environ.get("ORCH_PDL", "1") != "0" and clusters_supported(device)


_CONFIGS: dict[tuple, _LaunchConfig] = {}


def launch_config(grid: tuple[int, ...], block: tuple[int, ...], shared_mem: int, stream: int, pdl: bool = True,
                  cluster: tuple[int, int, int] | None = None) -> _LaunchConfig:
    """The launch configuration of this geometry on this stream (with PDL's attribute, and the cluster
    dimension when given), built once (the driver only reads it during the launch call); at most 4096 kept."""
    key = (tuple(grid), tuple(block), shared_mem, stream, pdl, None if cluster is None else tuple(cluster))
    cfg = _CONFIGS.get(key)
    if cfg is None:
        if len(_CONFIGS) >= 4096:
            _CONFIGS.clear()
        g, b = (*key[0], 1, 1)[:3], (*key[1], 1, 1)[:3]
        attrs, n = _attrs(pdl, key[5])
        cfg = _CONFIGS[key] = _LaunchConfig((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem, stream,
                                            attrs, n)
    return cfg


def _launch_ex(fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int,
               stream: int, pdl: bool, cluster: tuple[int, int, int] | None) -> None:
    cfg = launch_config(grid, block, shared_mem, stream, pdl, cluster)
    params, values = kernel_params(args)
    rc = _driver().cuLaunchKernelEx(ctypes.byref(cfg), fn.ptr, params.ctypes.data, None)
    del values   # (alive until here: the driver has read the arguments)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc} ({_error_name(rc)})")


def _error_name(rc: int) -> str:
    name = ctypes.c_char_p()
    _driver().cuGetErrorName(rc, ctypes.byref(name))
    return (name.value or b"?").decode()


_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute
_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97  # CUdevice_attribute


@functools.lru_cache(maxsize=None)
def max_shared_per_block(device: int) -> int:
    """The most shared memory one block may ask for on a device (after raising its limit)."""
    n = ctypes.c_int()
    dev = ctypes.c_int()
    drv = _driver()
    if drv.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device)) != 0 or drv.cuDeviceGetAttribute(
            ctypes.byref(n), _MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev) != 0:
        return 48 * 1024
    return n.value


_shared_limits: dict[int, int] = {}   # kernel function handle -> the dynamic shared memory it may launch with


def set_shared_limit(fn: Any, shared_mem: int) -> None:
    """Let `fn` launch with `shared_mem` bytes of dynamic shared memory (past 48 KB with its static shared
    memory, it must be asked for). The limit only grows: launches with less keep working."""
    if shared_mem > _shared_limits.get(fn.ptr, 0):
        rc = _driver().cuFuncSetAttribute(ctypes.c_void_p(fn.ptr), _MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                          ctypes.c_int(shared_mem))
        if rc != 0:
            raise RuntimeError(f"cuFuncSetAttribute({shared_mem} B of shared memory) failed: {_error_name(rc)}")
        _shared_limits[fn.ptr] = shared_mem


def ptr(t: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument (0 for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def i32(v: int) -> np.int32:
    """An int kernel argument."""
    return np.int32(v)


def i64(v: int) -> np.int64:
    """A long long kernel argument."""
    return np.int64(v)


def f32(v: float) -> np.float32:
    """A float kernel argument."""
    return np.float32(v)


def aligned(*tensors: torch.Tensor, to: int = 16) -> bool:
    """Whether every tensor's address is a multiple of `to` bytes."""
    return all(t.data_ptr() % to == 0 for t in tensors)
