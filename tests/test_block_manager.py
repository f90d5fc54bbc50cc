"""Block manager: allocation accounting, prefix sharing of computed blocks, LRU eviction."""
import random

import pytest

from workers.block_manager import BlockManager
from workers.sampling import SamplingParams
from workers.sequence import Sequence

BS = 4


def _seq(i, tokens):
    return Sequence(seq_id=i, token_ids=list(tokens), params=SamplingParams())


def _compute(bm, seq):
    """Pretend the engine ran every token of the sequence."""
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def test_allocate_and_free_account_for_every_block():
    rng = random.Random(1)
    bm = BlockManager(num_blocks=16, block_size=BS)
    seqs = [_seq(i, [rng.randrange(100) for _ in range(rng.randrange(1, 14))]) for i in range(5)]
    for s in seqs:
        assert bm.allocate(s)
        assert len(s.block_table) == -(-s.num_tokens // BS)
    used = [b for s in seqs for b in s.block_table]
    assert len(set(used)) == len(used) == bm.num_used_blocks
    for s in seqs:
        bm.free(s)
        assert s.block_table == []
    assert bm.num_free_blocks == 16 and bm.num_used_blocks == 0


def test_allocation_fails_cleanly_when_full():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = _seq(0, range(9)), _seq(1, range(50, 55))
    assert bm.allocate(a)  # 3 blocks
    assert not bm.allocate(b)
    assert b.block_table == [] and bm.num_free_blocks == 0
    assert not bm.can_append(a, 13)
    bm.free(a)
    assert bm.allocate(b)


def test_shared_prefix_reuses_computed_blocks_only():
    rng = random.Random(2)
    prefix = [rng.randrange(1000) for _ in range(3 * BS)]
    bm = BlockManager(num_blocks=32, block_size=BS)
    a = _seq(0, prefix + [7, 8])
    b = _seq(1, prefix + [9])
    assert bm.allocate(a)
    assert bm.allocate(b)  # a not computed yet: nothing may be shared
    assert not set(a.block_table) & set(b.block_table) and b.num_computed_tokens == 0
    _compute(bm, a)
    c = _seq(2, prefix + [5, 6, 7])
    assert bm.allocate(c)
    assert c.block_table[:3] == a.block_table[:3]
    assert c.num_computed_tokens == 3 * BS
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.hit_tokens == 3 * BS and bm.queried_tokens == a.num_tokens + b.num_tokens + c.num_tokens


def test_a_fully_cached_prompt_still_runs_its_last_token():
    rng = random.Random(3)
    toks = [rng.randrange(1000) for _ in range(2 * BS)]
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = _seq(0, toks)
    bm.allocate(a)
    _compute(bm, a)
    b = _seq(1, toks)
    bm.allocate(b)
    assert b.num_computed_tokens == BS  # the last block is recomputed so logits exist
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_survive_until_evicted_least_recent_first():
    rng = random.Random(4)
    bm = BlockManager(num_blocks=6, block_size=BS)
    p1 = [rng.randrange(1000) for _ in range(2 * BS)]
    p2 = [rng.randrange(1000) for _ in range(2 * BS)]
    a, b = _seq(0, p1 + [1]), _seq(1, p2 + [2])
    for s in (a, b):
        bm.allocate(s)
        _compute(bm, s)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    # p1 still cached after both are freed
    a2 = _seq(2, p1 + [3])
    assert bm.allocate(a2) and a2.num_computed_tokens == 2 * BS
    bm.free(a2)
    # fill 3 blocks: the 2 unhashed ones go first, then p2's tail (p2 was used longest ago);
    # p1, used last, survives whole and p2 keeps its first block
    filler = _seq(3, [rng.randrange(1000) for _ in range(3 * BS)])
    assert bm.allocate(filler)
    a3, b3 = _seq(4, p1 + [4]), _seq(5, p2 + [5])
    bm.free(filler)
    assert bm.allocate(a3) and a3.num_computed_tokens == 2 * BS
    assert bm.allocate(b3) and b3.num_computed_tokens == BS


def test_append_grows_block_table_and_decode_blocks_get_cached():
    bm = BlockManager(num_blocks=8, block_size=BS)
    s = _seq(0, [5, 6, 7])
    bm.allocate(s)
    for t in range(10, 20):
        s.num_computed_tokens = s.num_tokens
        bm.mark_computed(s)
        s.token_ids.append(t)
        assert bm.can_append(s, s.num_tokens)
        bm.append(s, s.num_tokens)
        assert len(s.block_table) == -(-s.num_tokens // BS)
    assert len(s.block_hashes) == (s.num_tokens - 1) // BS


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = _seq(0, [1, 2, 3])
    bm.allocate(s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free(s)
