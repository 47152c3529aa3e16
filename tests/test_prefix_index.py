"""The prefix index and its plumbing, without Ray: longest cached prefix per replica, memory that follows what the
replicas hold, the replica's event buffer, the router actor's state (numbered reports, resync, dropped replicas,
journal and snapshots) and the request router's copy, the routing policy. The last test drives real block
managers with random workloads and checks the index against what they hold."""

from __future__ import annotations

import math
import random

import pytest

from nanovllm_ray.engine.block_manager import BlockManager
from nanovllm_ray.engine.sequence import Sequence
from nanovllm_ray.kv_events import BlockRemoved, BlockStored, prefix_block_hashes
from nanovllm_ray.router import (
    CacheEventBuffer,
    IndexMirror,
    PrefixIndex,
    PrefixRoutingConfig,
    RouterState,
    decide,
    is_imbalanced,
    longest_prefix,
)
from nanovllm_ray.router.policy import AFFINITY, BALANCE, LEAST_LOADED, DecayingCount
from nanovllm_ray.router.state import DROPPED, OK, RESYNC
from nanovllm_ray.sampling_params import SamplingParams

LOAD = (0, 0, 10, 10)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---- PrefixIndex ---------------------------------------------------------------------------------------------


def test_match_counts_the_leading_run_per_replica():
    idx = PrefixIndex()
    idx.apply("a", [1, 2, 3, 4], [])
    idx.apply("b", [1, 2], [])
    idx.apply("c", [2, 3, 4], [])  # holds later blocks but not the first: no prefix
    idx.apply("d", [1, 3, 4], [])  # a gap after the first block
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2, "d": 1}
    assert idx.match([1, 2]) == {"a": 2, "b": 2, "d": 1}
    assert idx.match([9, 1, 2]) == {}
    assert idx.match([]) == {}
    assert longest_prefix([1, 2, 3], {1: {"x"}, 2: {"x", "y"}, 3: {"x"}}.get) == {"x": 3}


def test_removed_blocks_and_dropped_replicas_leave_the_index():
    idx = PrefixIndex()
    idx.apply("a", range(100), [])
    idx.apply("b", range(50, 150), [])
    assert len(idx) == 150 and idx.num_blocks("a") == 100
    idx.apply("a", [], range(100))
    assert len(idx) == 100 and idx.num_blocks("a") == 0 and idx.holders(10) is None
    assert idx.match(list(range(50, 60))) == {"b": 10}
    assert idx.drop_replica("b") and not idx.drop_replica("b")
    assert len(idx) == 0
    idx.check()


def test_reset_replaces_what_a_replica_held():
    idx = PrefixIndex()
    idx.apply("a", [1, 2, 3], [])
    idx.apply("b", [1], [])
    idx.reset_replica("a", [7])
    assert idx.blocks("a") == {7} and idx.holders(1) == {"b"} and idx.holders(2) is None
    idx.reset_replica("a")  # a replica that (re)starts: empty
    assert "a" in idx and idx.num_blocks("a") == 0
    idx.check()


def test_apply_is_idempotent_for_known_state():
    idx = PrefixIndex()
    idx.apply("a", [1, 2], [])
    idx.apply("a", [1, 2], [3])  # stored again, removed unknown: no change
    assert idx.blocks("a") == {1, 2} and len(idx) == 2
    idx.check()


# ---- CacheEventBuffer ---------------------------------------------------------------------------------------


def test_buffer_starts_with_a_snapshot_then_sends_net_deltas():
    buf = CacheEventBuffer()
    buf.add([BlockStored(1, -1, ()), BlockStored(2, 1, ())])
    first = buf.take()
    assert first.snapshot is not None and sorted(first.snapshot) == [1, 2]
    assert buf.take() is None
    buf.add([BlockStored(3, 2, ()), BlockRemoved(3)])  # stored and evicted between reports: never sent
    buf.add([BlockRemoved(1), BlockStored(1, -1, ())])  # evicted and stored again: the router is right already
    assert buf.take() is None
    buf.add([BlockRemoved(2), BlockStored(4, -1, ())])
    r = buf.take()
    assert r.snapshot is None and r.stored == [4] and r.removed == [2]
    buf.request_resync()
    assert sorted(buf.take().snapshot) == [1, 4]


def test_buffer_falls_back_to_a_snapshot_past_max_pending():
    buf = CacheEventBuffer(max_pending=8)
    buf.take()
    buf.add([BlockStored(h, -1, ()) for h in range(20)])
    r = buf.take()
    assert r.snapshot is not None and sorted(r.snapshot) == list(range(20))
    with pytest.raises(ValueError):
        CacheEventBuffer(max_pending=0)


# ---- RouterState and IndexMirror ----------------------------------------------------------------------------


def test_reports_must_follow_each_other_or_the_replica_resyncs():
    st = RouterState()
    assert st.report("a", 0, LOAD, snapshot=[1, 2]) == OK
    assert st.report("a", 1, LOAD, stored=[3]) == OK
    assert st.report("a", 3, LOAD, stored=[4]) == RESYNC  # report 2 was lost
    assert st.index.blocks("a") == {1, 2, 3}
    assert st.report("a", 4, LOAD, snapshot=[1, 4]) == OK
    assert st.report("a", 5, LOAD, removed=[1]) == OK
    assert st.index.blocks("a") == {4}
    assert st.report("new", 7, LOAD, stored=[9]) == RESYNC  # unknown replica (or a restarted actor)
    assert st.loads["a"].num_free_blocks == 10


def test_a_restarted_replica_starts_empty_and_a_dead_one_is_purged():
    st = RouterState()
    st.report("a", 0, LOAD, snapshot=[1, 2, 3])
    st.report("b", 0, LOAD, snapshot=[1])
    st.report("a", 0, LOAD, snapshot=[])  # the same replica registers again: its old entries go
    assert st.index.num_blocks("a") == 0 and st.index.holders(1) == {"b"}
    assert st.drop_replicas(["b", "ghost"]) == ["b"]
    assert len(st.index) == 0 and "b" not in st.loads
    assert st.report("b", 1, LOAD, stored=[5]) == DROPPED  # a late report from the dead replica
    assert st.report("b", 2, LOAD, snapshot=[5]) == DROPPED
    assert len(st.index) == 0


def test_silent_replicas_expire_and_may_come_back():
    clock = Clock()
    st = RouterState(replica_timeout_s=5, clock=clock)
    st.report("a", 0, LOAD, snapshot=[1])
    st.report("b", 0, LOAD, snapshot=[2])
    clock.t = 4
    st.report("b", 1, LOAD)  # heartbeat
    clock.t = 6
    assert st.expire() == ["a"]
    assert st.index.replicas == ["b"]
    assert st.report("a", 1, LOAD, stored=[3]) == RESYNC
    assert st.report("a", 2, LOAD, snapshot=[1, 3]) == OK


def test_mirror_follows_the_state_through_deltas_and_snapshots():
    st = RouterState(max_journal_items=50)
    m = IndexMirror(expect_ttl_s=0)
    m.apply(st.pull(m.epoch, m.seq))
    rng = random.Random(0)
    numbers = {r: 0 for r in "abc"}
    for r in numbers:
        st.report(r, 0, LOAD, snapshot=[])
    live = "abc"
    for step in range(300):
        r = rng.choice(live)
        held = st.index.blocks(r)
        stored = [rng.randrange(40) for _ in range(rng.randrange(4))]
        stored = [h for h in dict.fromkeys(stored) if h not in held]
        removed = [h for h in held if rng.random() < 0.2 and h not in stored]
        numbers[r] += 1
        assert st.report(r, numbers[r], (step, 0, 0, 0), stored=stored, removed=removed) == OK
        if step == 150:
            st.drop_replicas(["c"])
            live = "ab"
        if rng.random() < 0.3:  # pulls at random times: some deltas, some too old (journal trimmed)
            m.apply(st.pull(m.epoch, m.seq))
            assert _sets(m.index) == _sets(st.index)
    m.apply(st.pull(m.epoch, m.seq))
    assert _sets(m.index) == _sets(st.index)
    assert m.loads.keys() == {"a", "b"} and m.seq == st.seq
    assert m.num_snapshots > 1  # the journal of 50 items was outrun at least once
    m.index.check()
    # another epoch (a restarted router actor): a snapshot, whatever the sequence number
    st2 = RouterState()
    st2.report("z", 0, LOAD, snapshot=[1])
    m.apply(st2.pull(m.epoch, m.seq))
    assert m.index.replicas == ["z"] and m.epoch == st2.epoch


def _sets(idx: PrefixIndex) -> dict[str, set[int]]:
    return {r: set(b) for r, b in idx.snapshot().items()}


def test_mirror_counts_blocks_it_expects_until_they_expire():
    clock = Clock()
    m = IndexMirror(expect_ttl_s=2, clock=clock)
    m.index.apply("a", [1, 2], [])
    assert m.match([1, 2, 3, 4]) == {"a": 2}
    m.expect("b", [1, 2, 3, 4])
    m.expect("a", [1, 2, 3])
    assert m.match([1, 2, 3, 4]) == {"a": 3, "b": 4}
    clock.t = 1.5
    m.expect("b", [1, 2])  # renewed for the first two
    clock.t = 2.5
    assert m.match([1, 2, 3, 4]) == {"a": 2, "b": 2}
    clock.t = 4
    assert m.match([1, 2, 3, 4]) == {"a": 2} and m.num_expected == 0


# ---- policy -------------------------------------------------------------------------------------------------


def test_policy_prefers_the_longest_prefix_unless_out_of_balance():
    cfg = PrefixRoutingConfig(balance_abs_threshold=4, balance_rel_threshold=1.5, cache_threshold=0.25)
    rng = random.Random(0)
    d = decide(["a", "b", "c"], 10, {"a": 8, "b": 3}, {"a": 3, "b": 1, "c": 0}, {}, cfg, rng)
    assert d.reason == AFFINITY and d.ranking == ["a", "b", "c"] and d.matched_blocks == 8
    # equal prefixes: the less loaded
    d = decide(["a", "b"], 10, {"a": 8, "b": 8}, {"a": 3, "b": 1}, {}, cfg, rng)
    assert d.ranking[0] == "b"
    # out of balance (5 - 0 > 4 and 5 > 0 * 1.5): the least loaded, whatever it caches
    d = decide(["a", "b"], 10, {"a": 10}, {"a": 5, "b": 0}, {}, cfg, rng)
    assert d.reason == BALANCE and d.ranking == ["b", "a"]
    # a big gap that is small relative to the load is still in balance
    d = decide(["a", "b"], 10, {"a": 10}, {"a": 30, "b": 25}, {}, cfg, rng)
    assert d.reason == AFFINITY and d.ranking[0] == "a"
    # a prefix under the cache threshold (2 of 10 blocks < 25%): least loaded, then the fewest cached blocks
    d = decide(["a", "b", "c"], 10, {"a": 2}, {"a": 1, "b": 0, "c": 0}, {"b": 50, "c": 5}, cfg, rng)
    assert d.reason == LEAST_LOADED and d.ranking == ["c", "b", "a"]
    assert decide([], 3, {}, {}, {}, cfg).ranking == []
    assert not is_imbalanced([100], cfg)


def test_recent_requests_decay():
    c = DecayingCount(10.0)
    assert c.get(0) == 0
    c.add(0)
    c.add(0)
    assert c.get(0) == 2 and c.get(10) == pytest.approx(2 / math.e)
    c.add(10)
    assert c.get(10) == pytest.approx(1 + 2 / math.e)
    off = DecayingCount(0)
    off.add(1)
    assert off.get(1) == 0


def test_routing_config_checks_its_values():
    assert PrefixRoutingConfig.from_kwargs(balance_abs_threshold=2).balance_abs_threshold == 2
    with pytest.raises(ValueError, match="unknown keys"):
        PrefixRoutingConfig.from_kwargs(balance=1)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        PrefixRoutingConfig(balance_rel_threshold=0.5)
    with pytest.raises(ValueError, match="cache_threshold"):
        PrefixRoutingConfig(cache_threshold=2)


# ---- against real block managers ----------------------------------------------------------------------------


def _run(bm: BlockManager, tokens: list[int]) -> int:
    """Admit, prefill and free one request the way the scheduler does; returns its cached blocks."""
    seq = Sequence("r", tokens, SamplingParams(max_tokens=4))
    cached = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(seq, cached, n)
    bm.allocate(seq, cached, n)
    seq.num_computed_tokens += n
    bm.commit(seq)
    bm.free_seq(seq)
    return len(cached)


def test_index_fed_by_block_manager_events_predicts_cache_hits():
    """Two replicas with small caches (evicting all the time) under a shared-prefix workload: after each report
    and pull, the index holds exactly each block manager's cached hashes, and for any prompt the index's
    prefix length on a replica is the number of blocks that replica's block manager will reuse."""
    bs = 4
    rng = random.Random(1)
    bms = {r: BlockManager(24, bs, record_events=True) for r in ("a", "b")}
    bufs = {r: CacheEventBuffer(max_pending=16) for r in bms}
    numbers = dict.fromkeys(bms, -1)
    st, m = RouterState(), IndexMirror(expect_ttl_s=0)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 40))] for _ in range(6)]

    def sync():
        for r, bm in bms.items():
            bufs[r].add(bm.take_events())
            rep = bufs[r].take()
            if rep is not None:
                numbers[r] += 1
                assert st.report(r, numbers[r], LOAD, rep.stored, rep.removed, rep.snapshot) == OK
        m.apply(st.pull(m.epoch, m.seq))

    sync()
    for _ in range(300):
        prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(0, 20))]
        hashes = prefix_block_hashes(prompt, bs, max_blocks=(len(prompt) - 1) // bs)
        predicted = m.match(hashes)
        r = rng.choice("ab")
        assert _run(bms[r], prompt) == predicted.get(r, 0)
        sync()
        for name, bm in bms.items():
            assert m.index.blocks(name) == set(bm.hash_to_block), name
    assert 0 < len(m.index) <= sum(bm.num_blocks for bm in bms.values())
    m.index.check()
