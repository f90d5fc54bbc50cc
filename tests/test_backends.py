"""The CUDA backend's torch-only ops (prefill attention: chunks grouped and batched) against the CPU
reference, run on CPU tensors: random chunk lengths, contexts, GQA groupings, block sizes, windows."""
from __future__ import annotations

import random

import pytest
import torch

from workers.backends import cpu, cuda


@pytest.mark.parametrize("seed", range(40))
def test_grouped_prefill_attention_equals_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    nh, nkv, hd = rng.choice([(8, 2, 16), (4, 4, 8), (6, 1, 16)])
    bs = rng.choice([1, 4, 5])
    S = rng.randint(1, 4)
    lens = [rng.randint(1, 9) for _ in range(S)]
    ctxs = [n + rng.choice([0, 0, rng.randint(1, 20)]) for n in lens]
    if rng.random() < 0.3:                       # one group of equal chunks: no gather/scatter of rows
        lens, ctxs = [lens[0]] * S, [ctxs[0]] * S
    maxb = max(-(-c // bs) for c in ctxs) + 1
    nblocks = S * maxb + 2
    tables = torch.randperm(nblocks)[: S * maxb].view(S, maxb).to(torch.int32)
    kc = torch.randn(nblocks, bs, nkv, hd, dtype=torch.float64)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(lens), nh, hd, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctxs, dtype=torch.int32)
    window = rng.choice([None, None, 3])
    got = cuda.prefill_attention(q, kc, vc, cu, ctx, tables, 0.3, window)
    want = cpu.prefill_attention(q, kc, vc, cu, ctx, tables, 0.3, window)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-6
