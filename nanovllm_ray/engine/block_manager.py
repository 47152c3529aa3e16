"""Paged KV blocks with hash-based prefix caching.

Each full, computed block is keyed by its chained hash (nanovllm_ray/kv_events.py, with the stored / removed events
recorded here for a prefix-aware router). Blocks are reference counted; a freed block keeps its hash and contents and
stays reusable until it is evicted, least recently freed first. Lookups compare token ids as well as the hash, so a
hash collision can never serve the wrong KV.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from nanovllm_ray.engine.sequence import Sequence
from nanovllm_ray.kv_events import NO_PARENT, BlockRemoved, BlockStored, KVCacheEvent, hash_block


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int = NO_PARENT  # with token_ids, the key that was hashed: compared on lookup
    token_ids: tuple[int, ...] = ()



class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.record_events = record_events
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is evicted next. Unhashed blocks go to the front.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.events: list[KVCacheEvent] = []
        self.num_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_cache_hits = 0  # of those, tokens found

    # ---- queries -------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs  # the last token must be computed to get logits
        hits: list[int] = []
        parent = NO_PARENT
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            # A hash collision: the same tokens under another parent (another position) hold other KV.
            if block.token_ids != tokens or block.parent_hash != parent:
                break
            hits.append(block_id)
            parent = h
        return hits

    def can_allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Whether seq (with no blocks yet) can take the cached blocks plus room for num_new_tokens more."""
        reused_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return needed <= len(self.free) - reused_free

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= len(self.free)

    # ---- changes -------------------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """Give a newly admitted seq its cached prefix blocks and room for num_new_tokens more."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = len(cached) * self.block_size
        if self.enable_prefix_caching:
            self.num_cache_queries += seq.num_tokens
            self.num_cache_hits += seq.num_computed_tokens
        self.append(seq, num_new_tokens)

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room in seq's block table for num_new_tokens beyond its computed ones."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        assert needed <= len(self.free), "caller must check can_append first"
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks of seq that became full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else NO_PARENT
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash_block(parent, tokens)
            seq.block_hashes.append(h)
            if h in self.hash_to_block:
                continue  # another block already holds these tokens: keep this one private
            block = self.blocks[seq.block_table[i]]
            block.hash, block.parent_hash, block.token_ids = h, parent, tokens
            self.hash_to_block[h] = block.block_id
            if self.record_events:
                self.events.append(BlockStored(h, parent, tokens))

    def free_seq(self, seq: Sequence) -> None:
        """Drop seq's references; its blocks become reusable, tail blocks evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def take_events(self) -> list[KVCacheEvent]:
        events, self.events = self.events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds."""
        for block_id in self.free:
            self._evict(self.blocks[block_id])

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        self._evict(block)
        block.ref_count = 1
        return block_id

    def _evict(self, block: Block) -> None:
        if block.hash is None:
            return
        if self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
            if self.record_events:
                self.events.append(BlockRemoved(block.hash))
        block.hash, block.parent_hash, block.token_ids = None, NO_PARENT, ()
