"""cuBLASLt through ctypes, for decode GEMMs y[M,N] = x[M,K] @ w[N,K]^T: the algorithms cuBLAS's heuristic
offers for a shape (torch's matmul always runs its first), each runnable on torch's current stream (CUDA
graph capture included), so that the build can time them and keep the fastest.

An algorithm is cuBLASLt's opaque 64-byte `cublasLtMatmulAlgo_t`, kept as 8 integers: valid for the cuBLAS
build that offered it (the engine manifest pins the CUDA and torch versions) and checked with
`cublasLtMatmulAlgoCheck` before first use at any other row count."""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import site

import torch

_COMPUTE_32F = 68                          # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_16F, _R_16BF = 0, 2, 14         # cudaDataType_t
_DESC_TRANSA, _DESC_TRANSB = 3, 4          # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE_BYTES = 1              # cublasLtMatmulPreferenceAttributes_t
_OP_N, _OP_T = 0, 1
WORKSPACE_BYTES = 32 << 20
MAX_ALGOS = 16


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _lib() -> ctypes.CDLL:
    """libcublasLt: the one torch loaded (by soname), else the wheel's copy under site-packages/nvidia."""
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        paths = [p for d in site.getsitepackages()
                 for p in glob.glob(os.path.join(d, "nvidia", "**", "libcublasLt.so*"), recursive=True)]
        if not paths:
            raise RuntimeError("cuBLASLt: libcublasLt.so not found (neither loaded by torch nor under site-packages)")
        lib = ctypes.CDLL(sorted(paths)[-1])
    vp, u64, i64, ci = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
    lib.cublasLtCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(vp), ci, ci]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ci, vp, ctypes.c_size_t]
    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(vp), ci, u64, u64, i64]
    lib.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ci, vp, ctypes.c_size_t]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ci, ctypes.POINTER(_Heuristic),
                                                   ctypes.POINTER(ci)]
    lib.cublasLtMatmulAlgoCheck.argtypes = [vp, vp, vp, vp, vp, vp, ctypes.POINTER(_Algo), ctypes.POINTER(_Heuristic)]
    lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(_Algo), vp,
                                   ctypes.c_size_t, vp]
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {rc}")


@functools.cache
def handle_for(device: int) -> ctypes.c_void_p:
    """The cuBLASLt handle of a device (loads the library on first use; raises where it cannot)."""
    torch.cuda.init()
    with torch.cuda.device(device):
        h = ctypes.c_void_p()
        _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
    return h


_workspaces: dict[int, torch.Tensor] = {}


def prepare(device: int) -> None:
    """Create a device's handle and workspace now (the engine does at load, so that neither is first made
    while a decode graph is being captured; otherwise they are made at first use)."""
    handle_for(device)
    if device not in _workspaces:
        _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")


def _workspace(device: int) -> torch.Tensor:
    if device not in _workspaces:
        prepare(device)
    return _workspaces[device]


@functools.cache
def _plan(m: int, n: int, k: int, ldx: int, dtype: torch.dtype) -> tuple:
    """(operation, W layout, x layout, y layout) descriptors. Column-major view: y^T[N,M] = W^T[K,N]^T @ x^T[K,M]."""
    lib, vp = _lib(), ctypes.c_void_p
    dt = {torch.float16: _R_16F, torch.bfloat16: _R_16BF, torch.float32: _R_32F}[dtype]
    op = vp()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(op), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
    for attr, val in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
        v = ctypes.c_int(val)
        _check(lib.cublasLtMatmulDescSetAttribute(op, attr, ctypes.cast(ctypes.byref(v), vp), 4), "MatmulDescSetAttribute")
    layouts = []
    for rows, cols, ld in ((k, n, k), (k, m, ldx), (n, m, n)):
        lay = vp()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dt, rows, cols, ld), "MatrixLayoutCreate")
        layouts.append(lay)
    return (op, *layouts)


def _shape(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int, torch.dtype]:
    return x.shape[0], w.shape[0], x.shape[1], x.stride(0), x.dtype


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """2-D x with unit column stride, contiguous w of x's type and width, 16-byte aligned."""
    return (x.dim() == 2 and w.dim() == 2 and x.is_cuda and x.stride(1) == 1 and w.is_contiguous()
            and w.dtype == x.dtype and x.dtype in (torch.float16, torch.bfloat16) and w.shape[1] == x.shape[1]
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def algorithms(x: torch.Tensor, w: torch.Tensor, count: int = MAX_ALGOS) -> list[list[int]]:
    """The heuristic's algorithms for x @ w.T, best-ranked first (torch runs the first), as 8 integers each."""
    lib = _lib()
    op, a, b, c = _plan(*_shape(x, w))
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
    ws = ctypes.c_uint64(WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES,
                                                    ctypes.cast(ctypes.byref(ws), ctypes.c_void_p), 8),
           "MatmulPreferenceSetAttribute")
    results = (_Heuristic * count)()
    found = ctypes.c_int(0)
    _check(lib.cublasLtMatmulAlgoGetHeuristic(handle_for(x.device.index), op, a, b, c, c, pref, count, results,
                                              ctypes.byref(found)), "MatmulAlgoGetHeuristic")
    lib.cublasLtMatmulPreferenceDestroy(pref)
    return [list(results[i].algo.data) for i in range(found.value) if results[i].state == 0]


@functools.cache
def _algo_struct(algo: tuple[int, ...]) -> _Algo:
    return _Algo((ctypes.c_uint64 * 8)(*algo))


@functools.cache
def _usable(algo: tuple[int, ...], shape: tuple) -> bool:
    """Whether an algorithm (found for another row count) runs this shape within the workspace."""
    op, a, b, c = _plan(*shape)
    res = _Heuristic()
    rc = _lib().cublasLtMatmulAlgoCheck(handle_for(torch.cuda.current_device()), op, a, b, c, c,
                                         ctypes.byref(_algo_struct(algo)), ctypes.byref(res))
    return rc == 0 and res.workspaceSize <= WORKSPACE_BYTES


def usable(x: torch.Tensor, w: torch.Tensor, algo: list[int] | tuple[int, ...]) -> bool:
    return _usable(tuple(algo), _shape(x, w))


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)   # alpha, beta (host scalars, read at each call)


def matmul(x: torch.Tensor, w: torch.Tensor, algo: list[int] | tuple[int, ...]) -> torch.Tensor:
    """x[M,K] @ w[N,K]^T with one given algorithm, on torch's current stream (check `supported` and `usable`)."""
    dev = x.device.index
    op, a, b, c = _plan(*_shape(x, w))
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    vp = ctypes.c_void_p
    _check(_lib().cublasLtMatmul(handle_for(dev), op, ctypes.byref(_ONE), w.data_ptr(), a, x.data_ptr(), b,
                                 ctypes.byref(_ZERO), y.data_ptr(), c, y.data_ptr(), c,
                                 ctypes.byref(_algo_struct(tuple(algo))), _workspace(dev).data_ptr(),
                                 WORKSPACE_BYTES, vp(torch.cuda.current_stream(x.device).cuda_stream)),
           "Matmul")
    return y
