"""Sampling: greedy, seeded reproducibility, top-k/top-p, temperature, penalty, logprobs, validation."""
import math

import pytest
import torch

from workers.sampling import InvalidParams, SamplingParams, sample

V = 50


def _logits(b, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def _run(logits, params, hist=None):
    gens = [p.make_generator() if not p.greedy else None for p in params]
    return sample(logits, params, hist or [[] for _ in params], gens)


def test_greedy_is_argmax_for_the_whole_batch():
    lg = _logits(7, 1)
    out = _run(lg, [SamplingParams() for _ in range(7)])
    assert [s.token_id for s in out] == lg.argmax(-1).tolist()


def test_same_seed_same_tokens_other_seed_other_tokens():
    lg = _logits(1, 2)

    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        g = p.make_generator()
        return [sample(lg, [p], [[]], [g])[0].token_id for _ in range(40)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_top_k_1_and_tiny_top_p_are_greedy():
    lg = _logits(6, 3)
    want = lg.argmax(-1).tolist()
    got_k = _run(lg, [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(6)])
    got_p = _run(lg, [SamplingParams(temperature=1.5, top_p=1e-6, seed=i) for i in range(6)])
    assert [s.token_id for s in got_k] == want == [s.token_id for s in got_p]


def test_top_k_samples_only_among_the_k_best():
    lg = _logits(1, 4)
    allowed = set(lg[0].topk(5).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=5, seed=9)
    g = p.make_generator()
    seen = {sample(lg, [p], [[]], [g])[0].token_id for _ in range(300)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    lg = _logits(1, 5)
    probs = lg[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n_keep = int((cum < 0.7).sum()) + 1
    allowed = set(order[:n_keep].tolist())
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=3)
    g = p.make_generator()
    seen = {sample(lg, [p], [[]], [g])[0].token_id for _ in range(400)}
    assert seen <= allowed and len(seen) == len(allowed)


def test_temperature_sampling_follows_the_softmax():
    lg = torch.randn(1, 4, generator=torch.Generator().manual_seed(6))
    t = 0.7
    p = SamplingParams(temperature=t, seed=11)
    g = p.make_generator()
    n = 4000
    counts = torch.bincount(torch.tensor([sample(lg, [p], [[]], [g])[0].token_id for _ in range(n)]), minlength=4)
    expect = (lg[0] / t).softmax(-1) * n
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 20, (counts, expect)  # 3 dof: p < 0.001


def test_repetition_penalty_discourages_seen_tokens():
    lg = _logits(1, 7).abs() + 0.1
    best = int(lg.argmax())
    out = sample(lg, [SamplingParams(repetition_penalty=1e3)], [[best]], [None])
    assert out[0].token_id != best
    out = sample(lg, [SamplingParams(repetition_penalty=1.0)], [[best]], [None])
    assert out[0].token_id == best


def test_logprobs_of_chosen_and_top_n():
    lg = _logits(3, 8)
    params = [SamplingParams(logprobs=True, top_logprobs=3), SamplingParams(),
              SamplingParams(temperature=1.0, seed=1, logprobs=True)]
    out = _run(lg, params)
    ref = lg.log_softmax(-1)
    assert math.isclose(out[0].logprob, float(ref[0].max()), rel_tol=1e-5)
    assert [t for t, _ in out[0].top] == ref[0].topk(3).indices.tolist()
    assert out[1].logprob is None
    assert math.isclose(out[2].logprob, float(ref[2, out[2].token_id]), rel_tol=1e-5)


@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_logprobs=99), "top_logprobs"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_validation_names_the_bad_field(kw, word):
    with pytest.raises(InvalidParams, match=word):
        SamplingParams(**kw).validate()
