"""Per-request sampling: parameters, their validation, and picking the next token of a batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20


class InvalidParams(ValueError):
    """A sampling parameter is out of range (the server answers INVALID_ARGUMENT)."""


@dataclass
class SamplingParams:
    """How to pick each next token of one request."""

    temperature: float = 0.0            # 0 = greedy
    top_k: int = 0                      # 0 = no limit
    top_p: float = 1.0                  # nucleus mass, in (0, 1]
    seed: int | None = None             # None = random
    repetition_penalty: float = 1.0     # > 0; 1 = off
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 16
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        """Raise InvalidParams naming the first bad field; returns self."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise InvalidParams(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise InvalidParams(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidParams(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InvalidParams(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise InvalidParams(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidParams(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParams(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if any(not s for s in self.stop):
            raise InvalidParams("stop strings must be non-empty")
        return self

    def make_generator(self) -> torch.Generator:
        """This request's random generator: seeded when a seed is given, else from the OS."""
        seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        return torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))


@dataclass
class Sample:
    """The chosen token of one row, with its log-probability and the top-n when asked."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    vals = logits[ids]
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and top-p; logits [B, V] already scaled."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def is_plain_greedy(p: SamplingParams) -> bool:
    """Whether `sample` picks this request's token as the plain argmax of its logits row (on the device)."""
    return p.greedy and p.repetition_penalty == 1.0 and not p.logprobs and p.top_logprobs == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> list[Sample]:
    """Pick one token per row of float32 logits [B, V] (any device); histories feed the repetition penalty.

    Plain greedy rows take one batched argmax on the logits' device; the other rows are copied to
    the CPU, where each request's own generator draws its token (so seeds give the same output on
    any device and in any batch).
    """
    special = [i for i, p in enumerate(params) if not is_plain_greedy(p)]
    chosen = logits.argmax(dim=-1).tolist()
    out = [Sample(t) for t in chosen]
    if not special:
        return out
    raw = logits[torch.tensor(special, device=logits.device)].float().cpu()
    work = raw.clone()
    for j, i in enumerate(special):
        p = params[i]
        if p.repetition_penalty != 1.0 and histories[i]:
            _apply_repetition_penalty(work[j], histories[i], p.repetition_penalty)
    rows = [j for j, i in enumerate(special) if not params[i].greedy]
    for j, i in enumerate(special):
        if params[i].greedy:
            out[i].token_id = int(work[j].argmax())
    if rows:
        ps = [params[special[j]] for j in rows]
        temps = torch.tensor([p.temperature for p in ps]).unsqueeze(1)
        sub = _filter_top_k_top_p(work[torch.tensor(rows)] / temps, torch.tensor([p.top_k for p in ps]),
                                  torch.tensor([p.top_p for p in ps]))
        probs = sub.softmax(dim=-1)
        for r, j in enumerate(rows):
            i = special[j]
            out[i].token_id = int(torch.multinomial(probs[r], 1, generator=generators[i]))
    for j, i in enumerate(special):
        p = params[i]
        if p.logprobs or p.top_logprobs:
            logp = raw[j].log_softmax(dim=-1)
            out[i].logprob = float(logp[out[i].token_id])
            if p.top_logprobs:
                vals, ids = logp.topk(p.top_logprobs)
                out[i].top = list(zip(ids.tolist(), vals.tolist()))
    return out
