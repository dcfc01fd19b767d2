"""BlockManager: the paged KV pool's bookkeeping, with prefix caching of full blocks.

A full block is registered under a hash chained over every token before it (as in nano-vllm),
but only after its K/V have been computed, so a hit never reads a block that is still being
filled. Freed blocks keep their hash and are handed out least-recently-freed first, so a shared
system prompt stays cached while the pool has room.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict

from engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(previous: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """SHA-256 over the previous block's digest and this block's ids as 8-byte integers.

    A key shared by two different token chains would let one request read another's K/V, so
    the key is collision-resistant; Python's 64-bit ``hash`` is not (``hash(5) ==
    hash(5 + 2**61 - 1)``, and a birthday search over 2**61 residues is within reach).
    About 2 us per 16-token block on a 2-core Zen 4, against 0.3 us for ``hash``.
    """
    return hashlib.sha256((previous or bytes(32)) + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[bytes, int] = {}
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for the longest cached prefix; the last token is never a hit, so
        the step that admits the sequence always has at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits, previous = [], None
        for index in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_token_ids(index, self.block_size)
            previous = chain_hash(previous, tokens)
            block_id = self.hash_to_block_id.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            hits.append(block_id)
        return hits

    def num_blocks_to_allocate(self, seq: Sequence) -> int:
        """Free blocks ``allocate(seq)`` would take (cached hits that are free count too)."""
        hits = self._match_prefix(seq)
        revived = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        return self.num_blocks_for(len(seq)) - len(hits) + revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_to_allocate(seq) <= self.num_free_blocks

    def num_to_deallocate_for(self, seqs: list[Sequence], num_blocks: int) -> int | None:
        """The fewest leading ``seqs`` whose deallocation leaves ``num_blocks`` free, or None."""
        free, holders = self.num_free_blocks, Counter()
        for count, seq in enumerate(seqs, start=1):
            for block_id in seq.block_table:
                holders[block_id] += 1
                free += holders[block_id] == self.blocks[block_id].ref_count
            if free >= num_blocks:
                return count
        return None

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        hits = self._match_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.last_block_hash = self.blocks[hits[-1]].hash if hits else None
        self.num_prefix_query_tokens += len(seq)
        self.num_prefix_hit_tokens += len(hits) * self.block_size
        for _ in range(self.num_blocks_for(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def num_new_blocks_for(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks_for(seq, num_new_tokens) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.num_new_blocks_for(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every block of ``seq`` that is full and computed for prefix reuse."""
        if not self.enable_prefix_caching:
            return
        while (seq.num_hashed_blocks + 1) * self.block_size <= seq.num_computed_tokens:
            index = seq.num_hashed_blocks
            tokens = seq.block_token_ids(index, self.block_size)
            seq.last_block_hash = chain_hash(seq.last_block_hash, tokens)
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.token_ids = seq.last_block_hash, tuple(tokens)
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
            seq.num_hashed_blocks += 1

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks
