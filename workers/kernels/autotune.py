"""Launch-choice tuning on this GPU for one shard's shapes (run by the engine build)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from workers.kernels import cublaslt as _lt
from workers.kernels import gemv as _gemv
from workers.kernels import paged_attention as _attn
from workers.kernels import skinny_gemm as _skinny
from workers.kernels import stream_gemv as _stream
from workers.kernels import tma_gemm as _tma
from workers.kernels.silu_mul import silu_mul
from workers.kernels.tuning import LT_BUCKETS, Tuning

log = logging.getLogger(__name__)

L2_ROTATE_BYTES = 256 * 1024 * 1024   # weights rotated through so timings do not run out of L2


def time_ms(fn: Callable[[int], Any], n_inputs: int, reps: int = 20, warmup: int = 3) -> float:
    """Device time of one fn(i) call in ms: `reps` calls (i cycling over n_inputs input sets) captured
    in a CUDA graph, so host launch overhead stays out, as it does in the decode graphs; median of 5."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % n_inputs)
    graph.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    del graph
    return sorted(times)[len(times) // 2]


def linear_shapes(model_config: dict, tp: int, tp_rank: int = 0) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the shard's weight matrices."""
    from workers.layout import local_heads, padded_vocab
    from workers.models.config import ModelConfig

    cfg = ModelConfig.from_dict(model_config)
    q, kv = local_heads(cfg, tp, tp_rank)
    hd, H = cfg.head_dim, cfg.hidden_size
    inter = cfg.intermediate_size // tp
    return {"qkv": ((len(q) + 2 * len(kv)) * hd, H), "o": (H, len(q) * hd), "gate_up": (2 * inter, H),
            "down": (H, inter), "lm_head": (padded_vocab(cfg, tp) // tp, H)}


def tune_gemv(shapes: dict[str, tuple[int, int]], dtype: torch.dtype, max_m: int = _gemv.MAX_M) -> dict[str, dict]:
    """Per "NxK": {"max_m": largest M up to which gemv beats cuBLAS (0: never), "choice": gemv's fastest
    (rows, unroll, gpu_grid) at M=1}."""
    out = {}
    if dtype not in (torch.float16, torch.bfloat16):
        return {f"{n}x{k}": {"max_m": 0, "choice": None} for n, k in shapes.values()}
    for name, (n, k) in shapes.items():
        key = f"{n}x{k}"
        copies = max(2, min(8, L2_ROTATE_BYTES // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5 for _ in range(copies)]
        x1 = torch.randn(1, k, device="cuda", dtype=dtype)
        per = {c: time_ms(lambda i, c=c: _gemv.gemv(x1, ws[i], choice=c), copies) for c in _gemv.CHOICES}
        choice = min(per, key=per.get)
        log.info("gemv %s M=1: %s", name, {str(c): round(v, 4) for c, v in per.items()})
        best = 0
        for m in range(1, max_m + 1):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ours = time_ms(lambda i: _gemv.gemv(x, ws[i], choice=choice), copies)
            theirs = time_ms(lambda i: F.linear(x, ws[i]), copies)
            log.debug("gemv %s M=%d: %.4f ms vs cuBLAS %.4f ms", name, m, ours, theirs)
            if ours > theirs:
                break
            best = m
        out[key] = {"max_m": best, "choice": choice}
        del ws
    return out


def tune_gemv_into(t: Tuning, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> None:
    """Fill `t`'s gemv entries (largest M on gemv, launch choice at M=1) from tune_gemv."""
    for key, r in tune_gemv(shapes, dtype).items():
        t.gemv_max_m[key] = r["max_m"]
        if r["choice"] is not None:
            t.gemv_rows[key], t.gemv_unroll[key], t.gemv_gpu_grid[key] = r["choice"]


def _weight_sets(shapes: dict[str, tuple[int, int]], dtype: torch.dtype):
    """(name, N, K, random weight copies rotated past L2) per shape; nothing for 32-bit types (the decode
    GEMM tunings are for 16-bit weights)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return
    for name, (n, k) in shapes.items():
        copies = max(2, min(8, L2_ROTATE_BYTES // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5 for _ in range(copies)]
        yield name, n, k, ws
        del ws


def tune_lt(shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
            margin: float = 0.02) -> dict[str, dict[int, list[int]]]:
    """Per "NxK": row bucket -> the cuBLASLt algorithm (of those its heuristic offers) that beats torch's
    matmul by more than `margin` at that many rows (other buckets are left out). Buckets past 256 rows are
    prefill steps (v50: at 8192 rows the best offered algorithm ran 2-4% faster than torch's first)."""
    out: dict[str, dict[int, list[int]]] = {}
    try:
        _lt.handle_for(torch.cuda.current_device())
    except (OSError, RuntimeError, AttributeError) as e:   # no usable libcublasLt: torch's matmul everywhere
        log.warning("cuBLASLt algorithms not tuned: %s", e)
        return out
    for name, n, k, ws in _weight_sets(shapes, dtype):
        copies = len(ws)
        for m in LT_BUCKETS:
            if m > 256 and name == "lm_head":   # (its rows: the sequences that want logits, a decode batch at most)
                continue
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            if not _lt.supported(x, ws[0]):
                continue
            algos = _lt.algorithms(x, ws[0])
            if not algos:
                continue
            reps = 20 if m <= 256 else 5   # (prefill rows: milliseconds a call)
            per = [time_ms(lambda i, a=a: _lt.matmul(x, ws[i], a), copies, reps=reps) for a in algos]
            theirs = time_ms(lambda i: F.linear(x, ws[i]), copies, reps=reps)
            best = min(range(len(per)), key=per.__getitem__)
            log.info("cuBLASLt %s M=%d: torch %.4f ms, algorithms %s", name, m, theirs, [round(t, 4) for t in per])
            if per[best] < theirs * (1 - margin):
                out.setdefault(f"{n}x{k}", {})[m] = algos[best]
        del ws   # (with the generator's own reference) before the next shape's copies are made
    return out


def _cublas(x: torch.Tensor, ws: list[torch.Tensor], tuned: Tuning, n: int, k: int) -> Callable[[int], Any]:
    """The cuBLAS GEMM decode would run for x @ ws[i].T: the cuBLASLt algorithm `tuned` has for this shape
    and row count where it runs it, else torch's matmul."""
    algo = tuned.lt_algo(n, k, x.shape[0])
    if algo is not None and _lt.usable(x, ws[0], algo):
        return lambda i: _lt.matmul(x, ws[i], algo)
    return lambda i: F.linear(x, ws[i])


def tune_skinny(shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                tuned: Tuning | None = None) -> dict[str, dict[int, list[int]]]:
    """Per "NxK": row bucket -> skinny_gemm's fastest choice where it beats cuBLAS at that many rows (with
    the cuBLASLt algorithm `tuned` has for it, where there is one; buckets where cuBLAS wins are left out)."""
    out: dict[str, dict[int, list[int]]] = {}
    tuned = tuned or Tuning()
    for name, n, k, ws in _weight_sets(shapes, dtype):
        copies = len(ws)
        for m in _skinny.ROW_BUCKETS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            per = {c: time_ms(lambda i, c=c: _skinny.skinny_gemm(x, ws[i], choice=c), copies)
                   for c in _skinny.CHOICES if _skinny.fits(c, m, dtype)}
            theirs = time_ms(_cublas(x, ws, tuned, n, k), copies)
            best = min(per, key=per.get)
            log.info("skinny %s M=%d: cuBLAS %.4f ms, ours %s", name, m, theirs,
                     {"x".join(map(str, c)): round(v, 4) for c, v in per.items()})
            if per[best] < theirs:
                out.setdefault(f"{n}x{k}", {})[m] = list(best)
        del ws
    return out


def _keep_fastest(out: dict[str, dict[int, list[int]]], key: str, m: int, per: dict[tuple, float], theirs: float,
                  margin: float, what: str) -> None:
    """Log a kernel's timings `per` choice at m rows against the other GEMM's, and keep the fastest choice
    in out[key][m] unless the other one is more than `margin` faster."""
    best = min(per, key=per.get)
    log.info("%s M=%d: other %.4f ms, ours %s", what, m, theirs,
             {"x".join(map(str, c)): round(v, 4) for c, v in per.items()})
    if per[best] <= theirs * (1 + margin):
        out.setdefault(key, {})[m] = list(best)


TMA_MARGIN = 0.10   # tma_gemm is kept at a row bucket unless the other GEMM times this much faster alone


def tune_tma(shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
             tuned: Tuning | None = None) -> dict[str, dict[int, list[int]]]:
    """Per "NxK": row bucket -> tma_gemm's fastest choice unless what would run otherwise at that many rows
    (skinny_gemm or the cuBLASLt algorithm `tuned` has for it, else torch's matmul) times more than
    TMA_MARGIN faster; nothing off sm_90 GPUs. gate_up is timed as decode runs it: silu(gate) * up in
    tma_gemm's epilogue against the other GEMM followed by the silu_mul kernel.
    Why a margin: in the decode graph our kernels start their weight copies while the kernel before them
    finishes (PDL) and cuBLAS's do not, which a timing of one GEMM repeated does not show (nor did a chain
    of GEMM and silu_mul, v48). v46: tma_gemm for qkv, o and down at 64 rows, timed up to 6.5% slower alone,
    ran the batch-64 decode step 0.2 ms (3%) faster than cuBLAS there."""
    out: dict[str, dict[int, list[int]]] = {}
    if not _tma.available():
        return out
    tuned = tuned or Tuning()
    for name, n, k, ws in _weight_sets(shapes, dtype):
        copies, glu = len(ws), name == "gate_up"
        for m in _tma.ROW_BUCKETS:
            if m <= tuned.gemv_limit(n, k):
                continue
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            if not _tma.supported(x, ws[0]):
                continue
            per = {c: time_ms(lambda i, c=c: _tma.tma_gemm(x, ws[i], choice=c, glu=glu), copies)
                   for c in _tma.CHOICES if _tma.fits(c, m)}
            skinny = tuned.skinny_choice(n, k, m)
            if skinny is not None:
                other = lambda i: _skinny.skinny_gemm(x, ws[i], choice=skinny)   # noqa: E731
            else:
                other = _cublas(x, ws, tuned, n, k)
            theirs = time_ms((lambda i: silu_mul(other(i))) if glu else other, copies)
            _keep_fastest(out, f"{n}x{k}", m, per, theirs, TMA_MARGIN, f"tma {name}")
        del ws
    return out


STREAM_MARGIN = 0.0   # stream_gemv is kept at a row count unless what runs otherwise times this much faster alone


def tune_stream(shapes: dict[str, tuple[int, int]], dtype: torch.dtype, tuned: Tuning | None = None,
                margin: float = STREAM_MARGIN) -> dict[str, dict[int, list[int]]]:
    """Per "NxK": row count (1 .. stream_gemv.MAX_M) -> stream_gemv's fastest choice unless what decode
    would run otherwise under `tuned` (gemv, tma_gemm, skinny_gemm or cuBLAS, as the GPU backend picks;
    with silu(gate) * up for gate_up, as decode runs it) times more than `margin` faster; nothing off
    sm_90+ GPUs."""
    from workers.backends import cuda as _backend
    from workers.kernels import tuning as _tuning

    out: dict[str, dict[int, list[int]]] = {}
    if not _stream.available():
        return out
    tuned = tuned or Tuning()
    old = _tuning.CURRENT
    _tuning.set_current(dataclasses.replace(tuned, stream={}))   # the backend's choice without stream_gemv
    try:
        for name, n, k, ws in _weight_sets(shapes, dtype):
            copies, glu = len(ws), name == "gate_up"
            other = _backend.linear_glu if glu else _backend.linear
            for m in range(1, _stream.MAX_M + 1):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                per = {c: time_ms(lambda i, c=c: _stream.stream_gemv(x, ws[i], choice=c, glu=glu), copies)
                       for c in _stream.CHOICES if _stream.supported(x, ws[0], c, glu)}
                if not per:
                    continue
                theirs = time_ms(lambda i: other(x, ws[i]), copies)
                _keep_fastest(out, f"{n}x{k}", m, per, theirs, margin, f"stream {name}")
            del ws
    finally:
        _tuning.set_current(old)
    return out


def tune_attention(nh: int, nkv: int, hd: int, dtype: torch.dtype, batches: tuple[int, ...],
                   contexts: tuple[int, ...], block_size: int = 16) -> dict[int, tuple[int, int]]:
    """batch -> (splits, stages) of the decode attention with the least summed slowdown over `contexts`
    (each context's time relative to its fastest choice): one graph serves every context length."""
    bmax = max(batches)
    blocks_per_seq = -(-max(contexts) // block_size)
    shape = (bmax * blocks_per_seq, block_size, nkv, hd)
    kc = torch.randn(shape, device="cuda", dtype=dtype)
    vc = torch.randn(shape, device="cuda", dtype=dtype)
    perm = torch.randperm(bmax * blocks_per_seq, device="cuda", dtype=torch.int64).to(torch.int32)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    out = {}
    for b in batches:
        q = torch.randn(b, nh, hd, device="cuda", dtype=dtype)
        n_sets = max(1, min(8, bmax // b))     # different sequences per call: the KV read misses L2
        bts = [perm[j * b * blocks_per_seq:(j + 1) * b * blocks_per_seq].view(b, blocks_per_seq)
               for j in range(n_sets)]
        choices = [(ns, st) for ns in (1, 2, 4, 8, 16, 32, 64) if ns == 1 or b * nkv * ns <= 16 * sms
                   for st in _attn.STAGE_CHOICES]
        score = dict.fromkeys(choices, 0.0)
        for ctx in contexts:
            cl = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
            t = {c: time_ms(lambda i, c=c: _attn.paged_decode_attention(
                q, kc, vc, bts[i], cl, hd ** -0.5, num_splits=c[0], stages=c[1]), n_sets, reps=8) for c in choices}
            for c in choices:
                score[c] += t[c] / min(t.values())
            log.debug("attention batch %d context %d: %s", b, ctx, t)
        out[b] = min(score, key=score.get)
    del kc, vc
    return out


def tune_shard(shard_manifest: dict, specs: list[Any]) -> Tuning:
    """The tuning table for a shard on the current GPU."""
    from workers.build import TUNE_BATCHES, TUNE_CONTEXTS
    from workers.convert import TORCH_DTYPES
    from workers.layout import local_heads
    from workers.models.config import ModelConfig

    cfg = ModelConfig.from_dict(shard_manifest["model_config"])
    dtype = TORCH_DTYPES[shard_manifest["dtype"]]
    q, kv = local_heads(cfg, shard_manifest["tp_size"], shard_manifest["tp_rank"])
    t = Tuning()
    shapes = linear_shapes(shard_manifest["model_config"], shard_manifest["tp_size"], shard_manifest["tp_rank"])
    tune_gemv_into(t, shapes, dtype)
    t.lt = tune_lt(shapes, dtype)
    if _tma.available():   # on sm_90 tma_gemm takes skinny_gemm's place (it was as fast or faster everywhere)
        t.tma = tune_tma(shapes, dtype, t)
    else:
        t.skinny = tune_skinny(shapes, dtype, t)
    t.stream = tune_stream(shapes, dtype, t)   # against what the tables above run at 1-4 rows
    probe_q = torch.empty(1, len(q), cfg.head_dim, dtype=dtype, device="cuda")
    probe_k = torch.empty(1, 16, len(kv), cfg.head_dim, dtype=dtype, device="cuda")
    if _attn.supported(probe_q, probe_k):
        per_batch = tune_attention(len(q), len(kv), cfg.head_dim, dtype, TUNE_BATCHES,
                                   tuple(min(c, cfg.max_position_embeddings) for c in TUNE_CONTEXTS))
        t.attention_splits = {b: c[0] for b, c in per_batch.items()}
        t.attention_stages = {b: c[1] for b, c in per_batch.items()}
    torch.cuda.empty_cache()
    return t
