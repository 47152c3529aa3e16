"""BlockManager on the CPU: chained hashes, reference counts, prefix reuse, eviction order, events, accounting.

Sequences are driven the way the scheduler drives them: find_cached_prefix -> can_allocate -> allocate, then
num_computed_tokens += n and commit(), append() for decode steps, free_seq() at the end.
"""

from __future__ import annotations

import pytest

from nanovllm_ray.engine import block_manager as bm_module
from nanovllm_ray.engine.block_manager import BlockManager
from nanovllm_ray.engine.sequence import Sequence
from nanovllm_ray.kv_events import NO_PARENT, BlockRemoved, BlockStored, hash_block, prefix_block_hashes
from nanovllm_ray.sampling_params import SamplingParams

BS = 4


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("req", tokens, SamplingParams(max_tokens=64))


def admit(bm: BlockManager, seq: Sequence, num_new: int | None = None) -> list[int]:
    """Admit seq with its cached prefix and room for num_new more tokens (default: the rest of the prompt)."""
    cached = bm.find_cached_prefix(seq)
    if num_new is None:
        num_new = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(seq, cached, num_new), f"no room for {num_new} tokens after {len(cached)} cached blocks"
    bm.allocate(seq, cached, num_new)
    assert seq.num_computed_tokens == len(cached) * bm.block_size
    return cached


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    seq.num_computed_tokens += n
    bm.commit(seq)


def prefill(bm: BlockManager, seq: Sequence) -> list[int]:
    cached = admit(bm, seq)
    compute(bm, seq, seq.num_uncomputed_tokens)
    return cached


def decode(bm: BlockManager, seq: Sequence, token: int) -> None:
    """Sample token (appended uncomputed), then compute it in the next step."""
    seq.token_ids.append(token)
    assert bm.can_append(seq, 1)
    bm.append(seq, 1)
    compute(bm, seq, 1)


def check_consistent(bm: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal the number of live block-table entries; the free list is the ref-0 blocks."""
    counts = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            counts[b] += 1
    assert [b.ref_count for b in bm.blocks] == counts
    assert set(bm.free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h, f"hash_to_block[{h}] -> block {b} whose hash is {bm.blocks[b].hash}"


# ---- hash chain ----------------------------------------------------------------------------------------------


def test_hash_block_is_deterministic_and_fixed():
    h0 = hash_block(NO_PARENT, [1, 2, 3, 4])
    assert h0 == hash_block(NO_PARENT, (1, 2, 3, 4)), "lists and tuples of the same ids must hash alike"
    # Regression values (xxh64 of little-endian int64 ids, chained through the parent): the router and the
    # engine on other hosts must agree, so these must never change silently.
    assert h0 == 8356527653647720045
    assert hash_block(h0, [5, 6, 7, 8]) == 610383040053763902
    assert prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == [h0, 610383040053763902]


def test_prefix_block_hashes_equal_committed_hashes():
    bm = BlockManager(16, BS)
    seq = make_seq(list(range(100, 114)))  # 14 tokens: 3 full blocks and a partial one
    prefill(bm, seq)
    expected = prefix_block_hashes(seq.token_ids, BS)
    assert len(expected) == 3
    assert seq.block_hashes == expected
    for i, h in enumerate(expected):
        assert bm.hash_to_block[h] == seq.block_table[i], f"block {i} not registered under its chained hash"
        assert bm.blocks[seq.block_table[i]].token_ids == tuple(seq.token_ids[i * BS:(i + 1) * BS])
    assert prefix_block_hashes(seq.token_ids, BS, max_blocks=2) == expected[:2]
    # Decode to fill the partial block: its hash appears once all 16 tokens are computed.
    decode(bm, seq, 1)
    assert len(seq.block_hashes) == 3, "a block must not be hashed before it is full and computed"
    seq.token_ids.append(2)
    assert len(seq.block_hashes) == 3, "an uncomputed token must not complete a block"
    bm.append(seq, 1)
    compute(bm, seq, 1)
    assert seq.num_computed_tokens == 16
    assert seq.block_hashes == prefix_block_hashes(seq.token_ids, BS)
    assert len(seq.block_hashes) == 4


def test_change_in_first_block_changes_every_later_hash():
    a = list(range(1, 17))
    b = [99] + a[1:]
    ha, hb = prefix_block_hashes(a, BS), prefix_block_hashes(b, BS)
    assert len(ha) == len(hb) == 4
    for i in range(4):
        assert ha[i] != hb[i], f"block {i} hash unchanged after editing block 0"
    # Editing block 2 leaves blocks 0 and 1 alone.
    c = a[:9] + [99] + a[10:]
    hc = prefix_block_hashes(c, BS)
    assert hc[:2] == ha[:2] and hc[2] != ha[2] and hc[3] != ha[3]


def test_same_block_under_different_parent_hashes_differently():
    tokens = [5, 6, 7, 8]
    p1, p2 = hash_block(NO_PARENT, [1, 1, 1, 1]), hash_block(NO_PARENT, [2, 2, 2, 2])
    hashes = {hash_block(NO_PARENT, tokens), hash_block(p1, tokens), hash_block(p2, tokens), hash_block(0, tokens)}
    assert len(hashes) == 4, "a block's hash must depend on its parent (and on having one)"
    # The same block at two positions of one prompt hashes differently.
    h = prefix_block_hashes(tokens * 3, BS)
    assert len(set(h)) == 3


# ---- reference counts and reuse ------------------------------------------------------------------------------


def test_shared_prefix_reference_counts():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    prefill(bm, a)
    b = make_seq(list(range(8)) + [50, 51, 52])
    free_before = bm.num_free_blocks
    cached = admit(bm, b)
    assert cached == a.block_table[:2], "b must reuse a's two full blocks"
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2], "partial blocks are never shared"
    assert bm.num_free_blocks == free_before - 1, "a hit on a held block must not use a free block"
    for blk in a.block_table[:2]:
        assert bm.blocks[blk].ref_count == 2
    compute(bm, b, b.num_uncomputed_tokens)
    check_consistent(bm, [a, b])

    shared = a.block_table[:2]
    bm.free_seq(a)
    assert a.block_table == [] and a.block_hashes == [] and a.num_computed_tokens == 0
    for blk in shared:
        assert bm.blocks[blk].ref_count == 1
        assert blk not in bm.free, "a block still held by b must not be on the free list"
    check_consistent(bm, [b])
    bm.free_seq(b)
    check_consistent(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_reuse_after_free():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(1, 14)))  # 13 tokens: 3 full blocks
    prefill(bm, a)
    a_blocks = list(a.block_table)
    bm.free_seq(a)
    assert bm.num_free_blocks == 16

    b = make_seq(list(range(1, 13)) + [77, 78])  # same 3 full blocks, different tail
    cached = admit(bm, b)
    assert cached == a_blocks[:3]
    assert b.num_computed_tokens == 3 * BS
    assert bm.num_cache_hits == 3 * BS and bm.num_cache_queries == 13 + 14
    assert bm.num_free_blocks == 16 - 4, "3 cached blocks leave the free list, plus 1 new block for the tail"
    compute(bm, b, b.num_uncomputed_tokens)
    check_consistent(bm, [b])
    bm.free_seq(b)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_last_token_never_served_from_cache(k):
    bm = BlockManager(16, BS)
    tokens = list(range(1, 1 + k * BS))
    a = make_seq(tokens + [0])
    prefill(bm, a)
    bm.free_seq(a)
    b = make_seq(tokens)  # exactly k full blocks, all cached
    cached = bm.find_cached_prefix(b)
    assert len(cached) == k - 1, f"prompt of {k} full blocks got {len(cached)} hits; the last token must be computed"
    admit(bm, b)
    assert b.num_uncomputed_tokens == BS
    c = make_seq(tokens + [0])
    assert len(bm.find_cached_prefix(c)) == k


def test_single_token_prompt_gets_no_hit():
    bm = BlockManager(8, BS)
    a = make_seq([3, 3, 3, 3, 3])
    prefill(bm, a)
    assert bm.find_cached_prefix(make_seq([3])) == []


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    prefill(bm, a)
    assert a.block_hashes == [] and bm.hash_to_block == {}
    bm.free_seq(a)
    assert bm.find_cached_prefix(make_seq(list(range(9)))) == []
    assert bm.num_cache_queries == 0 and bm.num_cache_hits == 0


# ---- eviction order ------------------------------------------------------------------------------------------


def test_least_recently_freed_evicted_first():
    bm = BlockManager(8, BS)
    a = make_seq([1] * 8 + [0])  # 2 full blocks (hashed) + 1 partial
    b = make_seq([2] * 8 + [0])
    prefill(bm, a)
    prefill(bm, b)
    a_full, b_full = a.block_table[:2], b.block_table[:2]
    bm.free_seq(a)
    bm.free_seq(b)
    free = list(bm.free)
    hashed = [blk for blk in free if bm.blocks[blk].hash is not None]
    unhashed = [blk for blk in free if bm.blocks[blk].hash is None]
    assert free[:len(unhashed)] == unhashed, f"unhashed blocks must be evicted before hashed ones: {free}"
    # a was freed first, so its blocks go first; within a sequence the tail block goes before the root.
    assert hashed == [a_full[1], a_full[0], b_full[1], b_full[0]], f"eviction order {hashed}"

    # Take all the unhashed blocks plus one: only a's tail block is evicted.
    c = make_seq(list(range(100, 100 + (len(unhashed) + 1) * BS - 1)))
    admit(bm, c)
    assert a_full[1] in c.block_table
    assert bm.blocks[a_full[0]].hash is not None
    assert bm.find_cached_prefix(make_seq([1] * 8 + [0])) == [a_full[0]], "a's root block should survive"
    assert bm.find_cached_prefix(make_seq([2] * 8 + [0])) == b_full
    check_consistent(bm, [c])


def test_partial_block_freed_last_is_reused_first():
    bm = BlockManager(8, BS)
    a = make_seq([1] * 8 + [0])
    prefill(bm, a)
    partial = a.block_table[2]
    others = [blk for blk in range(8) if blk not in a.block_table]
    bm.free_seq(a)
    # The partial block was freed after every never-used block, yet it is taken first.
    assert list(bm.free)[0] == partial
    assert set(list(bm.free)[1:1 + len(others)]) == set(others)
    d = make_seq([9, 9])
    admit(bm, d)
    assert d.block_table == [partial]


def test_hit_block_leaves_free_list_and_becomes_most_recent_when_freed():
    bm = BlockManager(8, BS)
    a = make_seq([1] * 8 + [0])
    b = make_seq([2] * 8 + [0])
    prefill(bm, a)
    prefill(bm, b)
    a0 = a.block_table[0]
    bm.free_seq(a)
    bm.free_seq(b)
    e = make_seq([1] * 4 + [5, 5])  # hits a's root block only
    cached = admit(bm, e)
    assert cached == [a0]
    assert a0 not in bm.free, "a hit block must leave the free list"
    assert bm.blocks[a0].ref_count == 1
    compute(bm, e, e.num_uncomputed_tokens)
    bm.free_seq(e)
    assert list(bm.free)[-1] == a0, "a block freed again must become the most recently freed"
    # Evicting all hashed blocks but one keeps a0.
    n_evict = sum(1 for blk in bm.free if bm.blocks[blk].hash is not None) - 1
    n_unhashed = sum(1 for blk in bm.free if bm.blocks[blk].hash is None)
    f = make_seq(list(range(100, 100 + (n_unhashed + n_evict) * BS)))
    admit(bm, f)
    assert a0 not in f.block_table
    assert bm.find_cached_prefix(make_seq([1] * 4 + [5])) == [a0]
    assert bm.find_cached_prefix(make_seq([2] * 8 + [0])) == []


# ---- collision guard -----------------------------------------------------------------------------------------


def test_hash_collision_never_serves_wrong_blocks(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, token_ids: 42)
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    prefill(bm, a)
    # Every block hashes to 42, so only a's first block can be registered.
    assert bm.hash_to_block == {42: a.block_table[0]}

    b = make_seq([11, 12, 13, 14, 15, 16, 17, 18, 19])
    assert bm.find_cached_prefix(b) == [], "different tokens under the same hash must not hit"
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.find_cached_prefix(c) == [a.block_table[0]], "identical first block should still hit"
    cached = admit(bm, c)
    assert bm.blocks[cached[0]].ref_count == 2
    compute(bm, c, c.num_uncomputed_tokens)
    check_consistent(bm, [a, c])
    d = make_seq([5, 6, 7, 8, 5, 6, 7, 8, 0])  # a's second block content, at position 0
    assert bm.find_cached_prefix(d) == []


def test_hash_collision_same_tokens_at_another_position(monkeypatch):
    """A block's KV depends on its position and prefix, not only on its tokens: a block whose tokens equal a
    cached block's, at another position, must not be served that block under a colliding hash."""
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, token_ids: 42)
    bm = BlockManager(16, BS)
    a = make_seq([5] * 9)
    prefill(bm, a)
    b = make_seq([5] * 9)
    hits = bm.find_cached_prefix(b)
    assert hits == [a.block_table[0]], (
        f"got {hits}: block 1 of [5]*9 was served block {a.block_table[0]}, which holds position 0's KV")
    admit(bm, b)
    compute(bm, b, b.num_uncomputed_tokens)
    check_consistent(bm, [a, b])


# ---- events --------------------------------------------------------------------------------------------------


def test_events_stored_and_drained():
    bm = BlockManager(16, BS, record_events=True)
    a = make_seq(list(range(1, 10)))  # 2 full blocks
    prefill(bm, a)
    h0, h1 = prefix_block_hashes(a.token_ids, BS)
    assert bm.take_events() == [BlockStored(h0, NO_PARENT, (1, 2, 3, 4)), BlockStored(h1, h0, (5, 6, 7, 8))]
    assert bm.take_events() == [], "take_events must drain"

    # A sequence that hits a's first block stores only its own new block.
    b = make_seq([1, 2, 3, 4, 20, 21, 22, 23, 24])
    prefill(bm, b)
    hb1 = hash_block(h0, [20, 21, 22, 23])
    assert bm.take_events() == [BlockStored(hb1, h0, (20, 21, 22, 23))]

    # A duplicate computed concurrently (both miss) is kept private: no event for it.
    c = make_seq([30, 31, 32, 33, 0])
    d = make_seq([30, 31, 32, 33, 1])
    admit(bm, c)
    admit(bm, d)
    compute(bm, c, c.num_uncomputed_tokens)
    compute(bm, d, d.num_uncomputed_tokens)
    events = bm.take_events()
    assert events == [BlockStored(hash_block(NO_PARENT, [30, 31, 32, 33]), NO_PARENT, (30, 31, 32, 33))]

    # A decode that fills a block stores it.
    e = make_seq([40, 41, 42])
    prefill(bm, e)
    assert bm.take_events() == []
    decode(bm, e, 43)
    assert bm.take_events() == [BlockStored(hash_block(NO_PARENT, [40, 41, 42, 43]), NO_PARENT, (40, 41, 42, 43))]


def test_events_removed_on_eviction():
    bm = BlockManager(8, BS, record_events=True)
    a = make_seq(list(range(1, 10)))  # blocks: 2 hashed + 1 partial
    prefill(bm, a)
    h0, h1 = prefix_block_hashes(a.token_ids, BS)
    bm.take_events()
    bm.free_seq(a)
    assert bm.take_events() == [], "freeing keeps cached blocks: no removal yet"
    n_unhashed = bm.num_free_blocks - 2
    big = make_seq(list(range(100, 100 + n_unhashed * BS)))
    admit(bm, big)
    assert bm.take_events() == [], "unhashed blocks must be used before evicting cached ones"
    one_more = make_seq([200])
    admit(bm, one_more)
    assert bm.take_events() == [BlockRemoved(h1)], "the tail block is evicted first"
    two_more = make_seq([201])
    admit(bm, two_more)
    assert bm.take_events() == [BlockRemoved(h0)]
    assert bm.hash_to_block == {}


def test_no_events_when_not_recording():
    bm = BlockManager(4, BS, record_events=False)
    a = make_seq(list(range(1, 10)))
    prefill(bm, a)
    bm.free_seq(a)
    b = make_seq(list(range(50, 66)))
    admit(bm, b)  # evicts a's blocks
    bm.free_seq(b)
    bm.reset_prefix_cache()
    assert bm.events == [] and bm.take_events() == []


def test_reset_prefix_cache():
    bm = BlockManager(16, BS, record_events=True)
    a = make_seq(list(range(1, 10)))
    b = make_seq(list(range(50, 55)))
    prefill(bm, a)
    prefill(bm, b)
    ha = prefix_block_hashes(a.token_ids, BS)
    hb = prefix_block_hashes(b.token_ids, BS)
    bm.free_seq(a)
    bm.take_events()
    bm.reset_prefix_cache()
    assert sorted(e.block_hash for e in bm.take_events() if isinstance(e, BlockRemoved)) == sorted(ha)
    assert bm.find_cached_prefix(make_seq(list(range(1, 10)))) == [], "freed cached blocks must be forgotten"
    assert bm.find_cached_prefix(make_seq(list(range(50, 55)))) == [b.block_table[0]], "held blocks stay cached"
    assert set(bm.hash_to_block) == set(hb)
    assert bm.num_free_blocks == 16 - len(b.block_table)
    check_consistent(bm, [b])
    bm.free_seq(b)
    check_consistent(bm, [])


# ---- accounting ----------------------------------------------------------------------------------------------


def test_free_blocks_and_usage():
    bm = BlockManager(8, BS)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    a = make_seq(list(range(10)))  # 3 blocks
    prefill(bm, a)
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.free_seq(a)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0, "cached-but-free blocks count as free"
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_can_allocate_boundary():
    bm = BlockManager(8, BS)
    x = make_seq(list(range(100, 112)))  # holds 3 blocks
    prefill(bm, x)
    assert bm.num_free_blocks == 5
    exact = make_seq(list(range(20)))  # 5 blocks
    short = make_seq(list(range(21)))  # 6 blocks
    assert bm.can_allocate(exact, [], 20)
    assert not bm.can_allocate(short, [], 21)
    # A chunk of the longer prompt fits.
    assert bm.can_allocate(short, [], 20)
    admit(bm, exact)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(make_seq([1]), [], 1)


def test_cached_free_blocks_are_not_available_for_new_allocation():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(1, 10)))  # 2 hashed blocks + 1 partial
    prefill(bm, a)
    x = make_seq(list(range(100, 108)))  # holds 2 blocks
    prefill(bm, x)
    bm.free_seq(a)
    assert bm.num_free_blocks == 6  # 2 of them hold a's cached prefix

    fits = make_seq(list(range(1, 9)) + list(range(200, 216)))  # 2 cached blocks + 16 new tokens = 4 new blocks
    over = make_seq(list(range(1, 9)) + list(range(200, 217)))  # 5 new blocks
    cached = bm.find_cached_prefix(fits)
    assert len(cached) == 2 and bm.find_cached_prefix(over) == cached
    assert bm.can_allocate(fits, cached, 16)
    assert not bm.can_allocate(over, cached, 17), "the reused cached blocks cannot also serve as new blocks"
    admit(bm, fits)
    assert bm.num_free_blocks == 0
    check_consistent(bm, [x, fits])


def test_can_append_boundary():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(6)))  # 2 blocks, 2 free slots in the second
    prefill(bm, a)
    b = make_seq(list(range(50, 58)))  # 2 full blocks
    prefill(bm, b)
    assert bm.num_free_blocks == 0
    a.token_ids += [1, 2, 3]
    assert bm.can_append(a, 2), "two tokens fit in the partial block"
    assert not bm.can_append(a, 3), "a third token needs a block and none is free"
    b.token_ids.append(1)
    assert not bm.can_append(b, 1)
    bm.free_seq(b)
    assert bm.can_append(a, 3)
    assert bm.can_append(a, 2 + 2 * BS) and not bm.can_append(a, 3 + 2 * BS)
    bm.append(a, 3)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    bm.append(a, 2)  # already has room: no new block
    assert len(a.block_table) == 3


def test_benchmark_warm_up_and_timed_runs_find_none_of_each_others_blocks_cached():
    """throughput.py warms up on unseen(prompts[:8], 1); serve_throughput.py's levels rerun the workload's first
    requests, each run on timed_prompts(prompts, run). None may find another's blocks in the prefix cache."""
    from benchmarks.serve_throughput import timed_prompts
    from benchmarks.throughput import unseen, workload

    prompts, _ = workload(6, 40, 8)
    runs = [unseen(prompts, 1)] + [timed_prompts(prompts, run) for run in range(3)]
    assert runs[1] == prompts  # the first timed run is the workload as drawn
    assert all([len(p) for p in r] == [len(p) for p in prompts] for r in runs)  # same lengths, same floor
    bm = BlockManager(256, BS)
    for i, run in enumerate(runs):
        assert all(bm.find_cached_prefix(make_seq(p)) == [] for p in run), f"run {i} finds an earlier run's blocks"
        for p in run:  # prefill it; its freed blocks stay cached
            seq = make_seq(p)
            prefill(bm, seq)
            bm.free_seq(seq)
        assert all(len(bm.find_cached_prefix(make_seq(p))) == (len(p) - 1) // BS for p in run)  # the check can fail
