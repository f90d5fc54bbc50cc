"""Launch choices for this GPU and model (written by the engine build, defaults otherwise)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Tuning:
    """Per-shape launch choices: decode-attention splits per batch size, and up to which M gemv beats cuBLAS."""

    attention_splits: dict[int, int] = field(default_factory=dict)   # batch size -> number of splits
    attention_min_split: int = 32                                     # fewest keys a split takes
    attention_stages: dict[int, int] = field(default_factory=dict)    # batch size -> K/V stages (0: in registers)
    gemv_max_m: dict[str, int] = field(default_factory=dict)          # "NxK" -> largest M run by gemv
    default_gemv_max_m: int = 4
    gemv_rows: dict[str, int] = field(default_factory=dict)           # "NxK" -> output rows per warp
    default_gemv_rows: int = 2
    gemv_unroll: dict[str, int] = field(default_factory=dict)         # "NxK" -> loads in flight per lane/row
    gemv_gpu_grid: dict[str, bool] = field(default_factory=dict)      # "NxK" -> grid sized to the GPU
    skinny: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # "NxK" -> row bucket -> choice
    lt: dict[str, dict[int, list[int]]] = field(default_factory=dict)      # "NxK" -> row bucket -> cuBLASLt algo
    tma: dict[str, dict[int, list[int]]] = field(default_factory=dict)     # "NxK" -> row bucket -> tma_gemm choice
    stream: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # "NxK" -> rows -> stream_gemv choice

    def splits_for(self, batch: int, nkv: int) -> int:
        """Splits of the decode attention for `batch` sequences (tuned, else enough blocks for 2 waves)."""
        if self.attention_splits:
            return _per_batch(self.attention_splits, batch)
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        return max(1, min(64, -(-2 * sms // max(1, batch * nkv))))

    def stages_for(self, batch: int) -> int:
        """Decode-attention kernel for `batch` sequences: 0 (K/V in registers) or its cp.async stages."""
        return _per_batch(self.attention_stages, batch) if self.attention_stages else 0

    def gemv_limit(self, n: int, k: int) -> int:
        """Largest M for which an x[M,k] @ w[n,k]^T runs on gemv."""
        return self.gemv_max_m.get(f"{n}x{k}", self.default_gemv_max_m)

    def gemv_choice(self, n: int, k: int) -> tuple[int, int, bool]:
        """gemv's launch for an [n,k] weight: (rows per warp, loads in flight per lane and row, GPU-sized grid)."""
        key = f"{n}x{k}"
        rows = self.gemv_rows.get(key, self.default_gemv_rows)
        return rows, self.gemv_unroll.get(key, 8 // rows), self.gemv_gpu_grid.get(key, True)

    def skinny_choice(self, n: int, k: int, m: int) -> tuple[int, int, int, int] | None:
        """skinny_gemm's launch (weight rows per block, K splits, K columns per stage, stages) for an [n,k]
        weight at m rows, or None where cuBLAS was faster (or the shape was not tuned)."""
        from workers.kernels import skinny_gemm

        return _bucketed(self.skinny, n, k, m, skinny_gemm)

    def tma_choice(self, n: int, k: int, m: int) -> tuple[int, int, int] | None:
        """tma_gemm's launch (warpgroups, K splits, stages) for an [n,k] weight at m rows, or None where
        another GEMM was faster (or the shape was not tuned)."""
        from workers.kernels import tma_gemm

        return _bucketed(self.tma, n, k, m, tma_gemm)

    def stream_choice(self, n: int, k: int, m: int) -> tuple[int, int, int] | None:
        """stream_gemv's launch (KB a copy, KB of the ring, blocks an SM) for an [n,k] weight at m rows, or
        None where what runs otherwise was faster (or the shape was not tuned)."""
        from workers.kernels import stream_gemv

        return _bucketed(self.stream, n, k, m, stream_gemv)

    def lt_algo(self, n: int, k: int, m: int) -> list[int] | None:
        """The cuBLASLt algorithm (8 integers) for an [n,k] weight at m rows where one beat torch's matmul in
        the build, else None."""
        bucket = next((b for b in LT_BUCKETS if b >= m), None)
        return None if bucket is None else self.lt.get(f"{n}x{k}", {}).get(bucket)

    def to_dict(self) -> dict:
        """JSON-ready form (integer keys become strings)."""
        d = asdict(self)
        d["attention_splits"] = {str(k): v for k, v in self.attention_splits.items()}
        d["attention_stages"] = {str(k): v for k, v in self.attention_stages.items()}
        for name in _PER_BUCKET:
            d[name] = {key: {str(m): list(c) for m, c in per.items()} for key, per in getattr(self, name).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tuning":
        """Inverse of to_dict."""
        return cls(attention_splits={int(k): int(v) for k, v in d.get("attention_splits", {}).items()},
                   attention_min_split=int(d.get("attention_min_split", 32)),
                   attention_stages={int(k): int(v) for k, v in d.get("attention_stages", {}).items()},
                   gemv_max_m={str(k): int(v) for k, v in d.get("gemv_max_m", {}).items()},
                   default_gemv_max_m=int(d.get("default_gemv_max_m", 4)),
                   gemv_rows={str(k): int(v) for k, v in d.get("gemv_rows", {}).items()},
                   default_gemv_rows=int(d.get("default_gemv_rows", 2)),
                   gemv_unroll={str(k): int(v) for k, v in d.get("gemv_unroll", {}).items()},
                   gemv_gpu_grid={str(k): bool(v) for k, v in d.get("gemv_gpu_grid", {}).items()},
                   **{name: {str(key): {int(m): [int(v) for v in c] for m, c in per.items()}
                             for key, per in d.get(name, {}).items()} for name in _PER_BUCKET})


_PER_BUCKET = ("skinny", "lt", "tma", "stream")   # the "NxK" -> row bucket -> integers tables


def _bucketed(table: dict[str, dict[int, list[int]]], n: int, k: int, m: int, kernel: Any) -> tuple | None:
    """A GEMM kernel's tuned launch for an [n,k] weight at m rows: its entry at the kernel's row bucket for
    m (`kernel`: a module with MAX_M and row_bucket), None past MAX_M or where none was kept."""
    if m > kernel.MAX_M:
        return None
    c = table.get(f"{n}x{k}", {}).get(kernel.row_bucket(m))
    return tuple(c) if c else None


def _per_batch(table: dict[int, Any], batch: int) -> Any:
    """A per-batch-size entry of a non-empty table: the one tuned at the smallest batch size >= `batch`
    (the largest tuned one past them all)."""
    known = sorted(table)
    return table[next((k for k in known if k >= batch), known[-1])]


# row counts cuBLASLt algorithms are chosen at (M runs on the next one up): decode batches, then prefill steps
LT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CURRENT = Tuning()


def set_current(t: Tuning) -> None:
    """Make `t` the table every kernel launch consults."""
    global CURRENT
    CURRENT = t
