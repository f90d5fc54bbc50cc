"""Sequence: one request's tokens, KV block table and progress through the scheduler."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workers.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"    # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"    # holds KV blocks and is stepped every iteration
    FINISHED = "finished"  # done; blocks released


class FinishReason(str, enum.Enum):
    LENGTH = "length"      # max_tokens reached
    STOP = "stop"          # EOS, a stop token id or a stop string
    ABORT = "abort"        # cancelled by the client or the server


@dataclass
class Sequence:
    """A request inside the scheduler: prompt + output tokens, blocks and sampling state."""

    seq_id: int
    token_ids: list[int]                # prompt followed by generated tokens
    params: "SamplingParams"
    num_prompt_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the computed full blocks
    num_computed_tokens: int = 0        # tokens whose KV is in the cache
    num_cached_tokens: int = 0          # prompt tokens that came from the prefix cache (first admission)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    generator: "torch.Generator | None" = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
