"""Paged KV block manager with prefix caching (hashed full blocks, ref counts, LRU eviction)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from workers.sequence import Sequence


def blocks_for_sequences(max_num_seqs: int, max_seq_len: int, block_size: int) -> int:
    """KV blocks that max_num_seqs sequences of max_seq_len tokens can use at once (+1 spare):
    more would be allocated and never used."""
    return max_num_seqs * -(-max_seq_len // block_size) + 1


@dataclass
class Block:
    """One physical KV block: who uses it, and (once full and computed) what it holds."""

    block_id: int
    ref_count: int = 0
    hash: int | None = None           # set while the block is in the prefix cache
    token_ids: tuple[int, ...] = ()   # the tokens whose KV it holds, when hashed


def chain_hash(prev: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    """Hash of a full block, chained from the hash of the block before it."""
    return hash((prev, tuple(token_ids)))


class BlockManager:
    """Hands out KV blocks to sequences and reuses computed blocks across shared prompt prefixes.

    A free block keeps its cached content until it is handed out again; free blocks are reused
    least-recently-freed first, blocks holding nothing cacheable before any of them.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0      # ... and found there

    # --- accounting ----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    # --- internals -----------------------------------------------------------------
    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict its cached content
            if self._cached.get(block.hash) == bid:
                del self._cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return bid

    def _share(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._free[bid]
        block.ref_count += 1

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks matching the sequence's leading full blocks (at least one token left to run)."""
        if not self.enable_prefix_caching:
            return [], []
        bs, ids, hits, hashes = self.block_size, seq.token_ids, [], []
        h = None
        for i in range((seq.num_tokens - 1) // bs):
            toks = ids[i * bs:(i + 1) * bs]
            h = chain_hash(h, toks)
            bid = self._cached.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(toks):
                break
            hits.append(bid)
            hashes.append(h)
        return hits, hashes

    # --- public API ----------------------------------------------------------------
    def allocate(self, seq: Sequence) -> bool:
        """Give a new (or preempted) sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False, changing nothing, when there are not enough free blocks.
        """
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits, hashes = self._prefix_hits(seq)
        need_new = self.blocks_for(seq.num_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached blocks now in the free list
        if need_new + revived > len(self._free):
            return False
        for b in hits:
            self._share(b)
        seq.block_table = hits + [self._take_free() for _ in range(need_new)]
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * self.block_size
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += seq.num_computed_tokens
        return True

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence's blocks can be grown to hold num_tokens tokens."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the sequence's block table to hold num_tokens tokens (check can_append first)."""
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_free())

    def mark_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly computed full blocks into the prefix cache."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            toks = seq.token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, toks)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if self.enable_prefix_caching and h not in self._cached and block.hash is None:
                block.hash, block.token_ids = h, tuple(toks)
                self._cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (last block first, so shared prefixes stay cached longest)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self._free[bid] = None
                if block.hash is None:  # nothing worth keeping: hand it out first
                    self._free.move_to_end(bid, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served from the prefix cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
