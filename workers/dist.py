"""DistContext: one rank's place in the tp x pp grid and its torch.distributed groups.

Global rank = pp_rank * tp + tp_rank. Compute traffic (TP all-reduce/all-gather, PP send/recv)
uses the compute backend ("gloo" on CPU, "nccl" on GPU); control traffic (the driver's
broadcast of each step) always goes over a gloo group so it can carry pickled Python objects.
"""
from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

CONTROL_WORDS = 4096  # int64 words of the per-step control broadcast (a decode step of ~500 sequences)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this host's address `host` right now (for a rendezvous or a server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_of(tp: int, tp_rank: int, pp_rank: int) -> int:
    """Global rank of (tp_rank, pp_rank)."""
    return pp_rank * tp + tp_rank


@dataclass
class DistContext:
    """A rank's coordinates and process groups; `tp_group` is None when tp == 1."""

    rank: int
    world_size: int
    tp: int
    pp: int
    backend: str
    tp_group: Any = None
    control_group: Any = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> int:
        """Global rank of the same tp rank in the previous stage."""
        return rank_of(self.tp, self.tp_rank, self.pp_rank - 1)

    @property
    def next_rank(self) -> int:
        """Global rank of the same tp rank in the next stage."""
        return rank_of(self.tp, self.tp_rank, self.pp_rank + 1)

    @property
    def logits_rank(self) -> int:
        """The rank that sends the step's logits to the driver: last stage, tp rank 0."""
        return rank_of(self.tp, 0, self.pp - 1)

    @classmethod
    def init(cls, rank: int, world_size: int, tp: int, pp: int, init_method: str,
             backend: str = "gloo", timeout_s: float = 600.0) -> "DistContext":
        """Join the process group at `init_method` (e.g. tcp://host:port) and build the groups."""
        if tp * pp != world_size:
            raise ValueError(f"tp={tp} x pp={pp} != world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                 timeout=timeout)
        ctx = cls(rank, world_size, tp, pp, backend)
        # Every rank must create every group, in the same order.
        for s in range(pp):
            g = tdist.new_group([rank_of(tp, t, s) for t in range(tp)], backend=backend)
            if s == ctx.pp_rank and tp > 1:
                ctx.tp_group = g
        ctx.control_group = None if backend == "gloo" else tdist.new_group(backend="gloo", timeout=timeout)
        log.debug("rank %d/%d joined (tp_rank=%d pp_rank=%d, %s)", rank, world_size, ctx.tp_rank,
                  ctx.pp_rank, backend)
        return ctx

    def broadcast_ints(self, values: list[int] | None) -> list[int] | None:
        """Driver sends a list of ints (None: stop) to every rank; the others pass None and get it back.
        One fixed-size broadcast over the control group, a second only for lists over CONTROL_WORDS."""
        buf = torch.zeros(CONTROL_WORDS, dtype=torch.int64)
        if self.is_driver:
            buf[0] = -1 if values is None else len(values)
            head = (values or [])[: CONTROL_WORDS - 1]
            buf[1: 1 + len(head)] = torch.tensor(head, dtype=torch.int64)
        tdist.broadcast(buf, src=0, group=self.control_group)
        n = int(buf[0])
        if n < 0:
            return None
        if n < CONTROL_WORDS:
            return buf[1: 1 + n].tolist()
        rest = torch.zeros(n - (CONTROL_WORDS - 1), dtype=torch.int64)
        if self.is_driver:
            rest.copy_(torch.tensor(values[CONTROL_WORDS - 1:], dtype=torch.int64))
        tdist.broadcast(rest, src=0, group=self.control_group)
        return buf[1:].tolist() + rest.tolist()

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending `tensor` to global rank `dst`; wait() the returned work before reusing it."""
        return tdist.isend(tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `tensor` from global rank `src` (blocking)."""
        tdist.recv(tensor, src)
        return tensor

    def barrier(self) -> None:
        tdist.barrier(group=self.control_group)

    def close(self) -> None:
        """Leave the process group."""
        if tdist.is_initialized():
            tdist.destroy_process_group()
