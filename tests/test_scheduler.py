"""Scheduler + BlockManager on the CPU, driven by a fake engine loop with no model.

Each step: schedule(); finish_step(batch); every scheduled sequence whose tokens are all computed samples a fake
token and finishes once it has max_tokens of them. A shadow KV cache records, for every slot written, which
token prefix it was computed for, so a wrong prefix-cache hit or a write into a shared block fails a test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from nanovllm_ray.engine.block_manager import BlockManager
from nanovllm_ray.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm_ray.engine.sequence import Sequence, SequenceStatus
from nanovllm_ray.kv_events import prefix_block_hashes
from nanovllm_ray.sampling_params import SamplingParams


def fake_token(seq: Sequence) -> int:
    """A deterministic 'sampled' token: the same sequence regenerates the same tokens after a preemption."""
    return 1000 + (seq.seq_id * 7 + seq.num_completion_tokens) % 5


@dataclass
class StepRecord:
    batch: ScheduledBatch
    sampled: list[Sequence]
    preempted: list[Sequence]
    admitted: list[Sequence]  # newly allocated this step (fresh or after preemption), in batch order


@dataclass
class Sim:
    num_blocks: int
    block_size: int = 4
    max_num_seqs: int = 8
    budget: int = 16
    chunked: bool = True
    policy: str = "mixed"
    caching: bool = True
    bm: BlockManager = field(init=False)
    sched: Scheduler = field(init=False)
    kv: dict[tuple[int, int], int] = field(init=False, default_factory=dict)  # (block, slot) -> prefix key
    prefix_keys: dict[int, list[int]] = field(init=False, default_factory=dict)  # seq_id -> key per position
    admit_order: dict[int, int] = field(init=False, default_factory=dict)  # seq_id -> admission counter
    seqs: list[Sequence] = field(init=False, default_factory=list)
    records: list[StepRecord] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.bm = BlockManager(self.num_blocks, self.block_size, self.caching)
        cfg = SimpleNamespace(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.budget,
                              enable_chunked_prefill=self.chunked, scheduling_policy=self.policy,
                              max_model_len=1 << 20)
        self.sched = Scheduler(cfg, self.bm)

    def add(self, tokens: list[int], max_tokens: int) -> Sequence:
        seq = Sequence(f"r{len(self.seqs)}", tokens, SamplingParams(max_tokens=max_tokens))
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def _keys(self, seq: Sequence, n: int) -> list[int]:
        """Keys identifying token_ids[:p + 1] for p < n: what the KV at position p depends on."""
        keys = self.prefix_keys.setdefault(seq.seq_id, [])  # tokens are only appended, so keys only grow
        while len(keys) < n:
            i = len(keys)
            keys.append(hash((keys[-1] if keys else 0, i, seq.token_ids[i])))
        return keys

    def step(self, abort_mid_step: Sequence | None = None) -> StepRecord:
        sched, bm, bs = self.sched, self.bm, self.block_size
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        preemptions_before = {s.seq_id: s.num_preemptions for s in running_before}
        uncomputed_before = {s.seq_id: s.num_uncomputed_tokens for s in running_before}
        head_admissible = self._head_admissible()
        n_preempt0 = sched.num_preemptions

        batch = sched.schedule()

        # ---- what the scheduler did -------------------------------------------------------------------------
        ids = [s.seq_id for s in batch.seqs]
        assert len(batch.seqs) == len(batch.num_new_tokens)
        assert len(set(ids)) == len(ids), f"a sequence scheduled twice in one step: {ids}"
        assert batch.num_tokens <= self.budget, f"{batch.num_tokens} tokens > budget {self.budget}"
        assert len(batch.seqs) <= self.max_num_seqs and len(sched.running) <= self.max_num_seqs
        if sched.has_unfinished():
            assert batch.seqs, (f"empty step with work left: running={[s.request_id for s in sched.running]} "
                                f"waiting={[s.request_id for s in sched.waiting]} free={bm.num_free_blocks}")

        preempted = [s for s in running_before if s.num_preemptions > preemptions_before[s.seq_id]]
        assert len(preempted) == sched.num_preemptions - n_preempt0
        assert all(s.num_preemptions == preemptions_before[s.seq_id] + 1 for s in preempted)
        if preempted:
            k = len(preempted)
            assert preempted == running_before[-k:], "preemption must take the most recently admitted first"
        admitted = [s for s in batch.seqs if s.seq_id not in uncomputed_before or s in preempted]
        # Preempted sequences go to the front of the queue, in admission order; admission is first come first
        # served from that queue.
        queue = preempted + waiting_before
        assert admitted == queue[:len(admitted)], (
            f"admitted {[s.request_id for s in admitted]} from queue {[s.request_id for s in queue]}")
        assert list(sched.waiting) == queue[len(admitted):]
        if preempted and self.policy == "mixed":
            assert not admitted, "mixed policy: no admission in a step that preempted"
        for s in preempted:
            if s not in admitted:
                assert s.status == SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
                assert not s.block_hashes
        for s in admitted:
            self.admit_order[s.seq_id] = len(self.admit_order) + 1  # re-admission counts as a new admission
        order = [self.admit_order[s.seq_id] for s in sched.running]
        assert order == sorted(order), "running must stay in admission order"

        if self.policy == "prefill_first":
            decodes = [s for s in batch.seqs if s not in admitted and uncomputed_before[s.seq_id] == 1]
            prefills = [s for s in batch.seqs if s not in decodes]
            assert not (decodes and prefills), "prefill_first: a step mixes decodes and prefills"
            if head_admissible:
                assert waiting_before[0] in batch.seqs and not decodes, (
                    "prefill_first: an admissible waiting sequence was passed over for decodes")

        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status == SequenceStatus.RUNNING and seq in sched.running
            assert 1 <= n <= seq.num_uncomputed_tokens, f"{seq.request_id}: {n} new of {seq.num_uncomputed_tokens}"
            assert len(seq.block_table) * bs >= seq.num_computed_tokens + n, "no room for the new tokens"
            if not self.chunked and seq in admitted:
                assert n == seq.num_uncomputed_tokens, "chunking is off: a prompt must be computed whole"
            self._check_and_write_kv(seq, n)

        # ---- the model ran; apply the step ---------------------------------------------------------------
        if abort_mid_step is not None:
            sched.finish(abort_mid_step, "abort")
        sched.finish_step(batch)
        sampled = []
        for seq in batch.seqs:
            if seq.is_finished:
                continue
            if self.caching:
                assert seq.block_hashes == prefix_block_hashes(seq.token_ids, bs, seq.num_computed_tokens // bs)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(fake_token(seq))
                sampled.append(seq)
                if seq.num_completion_tokens >= seq.sampling_params.max_tokens:
                    sched.finish(seq, "length")
        self.check_blocks()
        record = StepRecord(batch, sampled, preempted, admitted)
        self.records.append(record)
        return record

    def _head_admissible(self) -> bool:
        """Whether the first waiting sequence can be admitted now, with no running prefill ahead of it."""
        sched, bm = self.sched, self.bm
        if not sched.waiting or len(sched.running) >= self.max_num_seqs:
            return False
        if any(s.num_uncomputed_tokens > 1 for s in sched.running):
            return False
        seq = sched.waiting[0]
        cached = bm.find_cached_prefix(seq)
        num_new = seq.num_tokens - len(cached) * bm.block_size
        if num_new > self.budget:
            if not self.chunked:
                return False
            num_new = self.budget
        return bm.can_allocate(seq, cached, num_new)

    def _check_and_write_kv(self, seq: Sequence, n: int) -> None:
        bs, start = self.block_size, seq.num_computed_tokens
        keys = self._keys(seq, start + n)
        for p in range(start):  # cached or computed earlier: must hold this prefix's KV
            slot = (seq.block_table[p // bs], p % bs)
            assert self.kv.get(slot) == keys[p], (
                f"{seq.request_id}: position {p} in block {slot[0]} holds KV of another prefix")
        for p in range(start, start + n):
            block = self.bm.blocks[seq.block_table[p // bs]]
            assert block.ref_count == 1, f"{seq.request_id} writes into block {block.block_id} shared by others"
            assert block.hash is None, f"{seq.request_id} writes into cached block {block.block_id}"
            self.kv[(block.block_id, p % bs)] = keys[p]

    def check_blocks(self) -> None:
        bm, sched = self.bm, self.sched
        counts = [0] * bm.num_blocks
        for s in sched.running:
            assert s.status == SequenceStatus.RUNNING
            assert len(s.block_table) == len(set(s.block_table)), f"{s.request_id} holds a block twice"
            for b in s.block_table:
                counts[b] += 1
        assert [b.ref_count for b in bm.blocks] == counts, "reference counts differ from the block tables"
        assert set(bm.free) == {i for i, c in enumerate(counts) if c == 0}
        for s in sched.waiting:
            assert s.status == SequenceStatus.WAITING and not s.block_table and s.num_computed_tokens == 0
        for s in self.seqs:
            if s.is_finished:
                assert not s.block_table and s not in sched.running and s not in sched.waiting

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def assert_all_free(self) -> None:
        bm = self.bm
        assert not self.sched.has_unfinished()
        assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
        assert all(b.ref_count == 0 for b in bm.blocks)


def expected_completion(seq: Sequence) -> list[int]:
    probe = Sequence("probe", [], seq.sampling_params)
    probe.seq_id = seq.seq_id
    out = []
    for _ in range(seq.sampling_params.max_tokens):
        out.append(fake_token(probe))
        probe.token_ids.append(out[-1])
    return out


def assert_finished_whole(sim: Sim) -> None:
    for s in sim.seqs:
        assert s.is_finished and s.finish_reason == "length", f"{s.request_id}: {s.status} {s.finish_reason}"
        assert s.num_completion_tokens == s.sampling_params.max_tokens, (
            f"{s.request_id}: {s.num_completion_tokens} tokens, max_tokens {s.sampling_params.max_tokens}")
        assert s.completion_token_ids == expected_completion(s)
    sim.assert_all_free()


# ---- budgets and chunked prefill -----------------------------------------------------------------------------


def test_budget_and_max_num_seqs_respected():
    sim = Sim(num_blocks=64, max_num_seqs=3, budget=10)
    for i in range(8):
        sim.add([i] * (3 + i), max_tokens=4)
    sim.run()
    assert max(len(r.batch.seqs) for r in sim.records) == 3
    assert max(r.batch.num_tokens for r in sim.records) == 10
    assert_finished_whole(sim)


def test_chunked_prefill_splits_long_prompt():
    sim = Sim(num_blocks=32, budget=8)
    seq = sim.add(list(range(30)), max_tokens=3)
    steps = []
    while sim.sched.has_unfinished():
        rec = sim.step()
        steps.append((rec.batch.num_new_tokens, seq.num_tokens, seq in rec.sampled))
    assert steps == [([8], 30, False), ([8], 30, False), ([8], 30, False), ([6], 31, True),
                     ([1], 32, True), ([1], 33, True)], steps
    assert_finished_whole(sim)


def test_chunked_prefill_shares_the_budget():
    sim = Sim(num_blocks=32, budget=8)
    a = sim.add(list(range(30)), max_tokens=2)
    b = sim.add(list(range(100, 105)), max_tokens=2)
    plan = []
    while sim.sched.has_unfinished():
        rec = sim.step()
        plan.append([(s.request_id, n) for s, n in zip(rec.batch.seqs, rec.batch.num_new_tokens)])
    assert plan[:5] == [[("r0", 8)], [("r0", 8)], [("r0", 8)], [("r0", 6), ("r1", 2)], [("r0", 1), ("r1", 3)]], plan
    assert a.first_token_time is None and b.num_cached_tokens == 0
    assert_finished_whole(sim)


def test_chunked_prefill_after_cached_prefix():
    sim = Sim(num_blocks=32, budget=8)
    sim.add(list(range(20)), max_tokens=1)
    sim.run()
    b = sim.add(list(range(20)) + list(range(50, 60)), max_tokens=1)  # 5 cached blocks, then 10 tokens
    rec = sim.step()
    assert rec.batch.num_new_tokens == [8] and b.num_cached_tokens == 20
    assert b.num_computed_tokens == 28
    rec = sim.step()
    assert rec.batch.num_new_tokens == [2] and rec.sampled == [b]
    assert_finished_whole(sim)


def test_no_chunking_long_prompt_waits():
    sim = Sim(num_blocks=32, budget=8, chunked=False)
    long = sim.add(list(range(10)), max_tokens=2)
    short = sim.add([1, 2], max_tokens=2)
    batch = sim.sched.schedule()
    assert batch.seqs == [], "a prompt longer than the budget must not be split when chunking is off"
    assert list(sim.sched.waiting) == [long, short], "first come first served: nothing jumps the queue"
    assert long.status == SequenceStatus.WAITING and not long.block_table
    assert sim.bm.num_free_blocks == 32


def test_no_chunking_prompt_waits_for_whole_budget():
    sim = Sim(num_blocks=32, budget=8, chunked=False)
    a = sim.add([1, 2, 3], max_tokens=4)
    sim.step()  # a prefilled: decoding from now on
    b = sim.add(list(range(10, 15)), max_tokens=1)  # 5 tokens: fits beside one decode
    rec = sim.step()
    assert rec.batch.seqs == [a, b] and rec.batch.num_new_tokens == [1, 5]
    c = sim.add(list(range(20, 28)), max_tokens=1)  # exactly the budget: waits until a is done
    while a in sim.sched.running:
        rec = sim.step()
        assert c not in rec.batch.seqs
    rec = sim.step()
    assert rec.batch.seqs == [c] and rec.batch.num_new_tokens == [8]
    sim.run()
    assert_finished_whole(sim)


# ---- preemption ----------------------------------------------------------------------------------------------


def test_preemption_of_the_most_recent_sequence():
    # 6 blocks: a, b and c take 2 each. a's first decode needs a third block, so c (admitted last) goes.
    sim = Sim(num_blocks=6, budget=64)
    a = sim.add(list(range(0, 8)), max_tokens=4)
    b = sim.add(list(range(10, 16)), max_tokens=2)
    c = sim.add(list(range(20, 26)), max_tokens=2)
    d = sim.add([30, 31], max_tokens=1)
    rec = sim.step()
    assert rec.batch.seqs == [a, b, c] and list(sim.sched.waiting) == [d]
    rec = sim.step()
    assert rec.preempted == [c], "the most recently admitted sequence must be preempted"
    assert rec.batch.seqs == [a, b]
    assert list(sim.sched.waiting) == [c, d], "a preempted sequence goes to the front of the queue"
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_tokens == 7, "a preempted sequence keeps its generated tokens"
    assert sum(b.ref_count for b in sim.bm.blocks) == len(a.block_table) + len(b.block_table)
    sim.run()
    first = {}
    for i, r in enumerate(sim.records[2:]):
        for s in r.admitted:
            first.setdefault(s.request_id, i)
    assert first["r2"] <= first["r3"], "the preempted sequence must resume before later arrivals"
    assert_finished_whole(sim)


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
def test_preemption_by_self(policy):
    # a, b, c hold 2 blocks each of 8; decoding needs more until the last admitted gives way.
    sim = Sim(num_blocks=8, budget=64, max_num_seqs=3, policy=policy)
    a = sim.add(list(range(0, 8)), max_tokens=12)
    b = sim.add(list(range(10, 18)), max_tokens=12)
    c = sim.add(list(range(20, 28)), max_tokens=12)
    d = sim.add([30, 31, 32, 33], max_tokens=1)
    sim.step()
    rec = sim.step()
    assert rec.preempted == [c] and rec.batch.seqs == [a, b]
    assert list(sim.sched.waiting) == [c, d]
    # d would fit, but c is first in line: d must not be admitted before c.
    while c.status == SequenceStatus.WAITING:
        rec = sim.step()
        assert d not in rec.admitted
    sim.run()
    assert sim.sched.num_preemptions >= 2
    assert_finished_whole(sim)


def test_resumed_sequence_reuses_its_cached_blocks():
    sim = Sim(num_blocks=6, budget=64)
    sim.add(list(range(0, 8)), max_tokens=4)
    sim.add(list(range(10, 16)), max_tokens=2)
    c = sim.add(list(range(20, 28)), max_tokens=2)  # 2 full blocks, hashed when prefilled
    sim.step()
    sim.step()
    assert c.num_preemptions == 1
    sim.run()
    assert c.num_cached_tokens == 0, "num_cached_tokens is set at the first admission only"
    assert sim.bm.num_cache_hits > 0, "the preempted sequence should find its own freed blocks again"
    assert_finished_whole(sim)


# ---- abort ---------------------------------------------------------------------------------------------------


def test_abort_waiting():
    sim = Sim(num_blocks=16)
    a = sim.add([1, 2, 3], max_tokens=2)
    b = sim.add([4, 5, 6], max_tokens=2)
    sim.sched.finish(a, "abort")
    assert a.is_finished and a.finish_reason == "abort"
    assert list(sim.sched.waiting) == [b]
    sim.run()
    assert b.finish_reason == "length"
    sim.assert_all_free()


def test_abort_running_decode():
    sim = Sim(num_blocks=16)
    a = sim.add(list(range(9)), max_tokens=10)
    sim.step()
    b = sim.add(list(range(9)), max_tokens=3)  # shares a's 2 full blocks
    sim.step()
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and all(sim.bm.blocks[i].ref_count == 2 for i in shared)
    assert a.num_completion_tokens == 2 and a.status == SequenceStatus.RUNNING
    sim.sched.finish(a, "abort")
    assert a.finish_reason == "abort" and a not in sim.sched.running and a.block_table == []
    assert all(sim.bm.blocks[i].ref_count == 1 for i in shared), "b still holds the shared blocks"
    sim.check_blocks()
    sim.run()
    assert b.finish_reason == "length"
    sim.assert_all_free()


def test_abort_partially_prefilled():
    sim = Sim(num_blocks=16, budget=8)
    a = sim.add(list(range(30)), max_tokens=2)
    sim.step()
    assert a.num_computed_tokens == 8 and a.status == SequenceStatus.RUNNING
    sim.sched.finish(a, "abort")
    sim.check_blocks()
    sim.assert_all_free()


def test_abort_preempted():
    sim = Sim(num_blocks=6, budget=64)
    sim.add(list(range(0, 8)), max_tokens=4)
    sim.add(list(range(10, 16)), max_tokens=2)
    c = sim.add(list(range(20, 26)), max_tokens=2)
    sim.step()
    sim.step()
    assert c.num_preemptions == 1 and c in sim.sched.waiting
    sim.sched.finish(c, "abort")
    assert c not in sim.sched.waiting and c.finish_reason == "abort"
    sim.run()
    sim.assert_all_free()


@pytest.mark.parametrize("prompt_len", [3, 8, 30])
def test_abort_while_the_step_runs(prompt_len):
    """A request aborted between schedule() and finish_step() (the engine's _apply skips it) frees everything
    and finish_step must not touch it."""
    sim = Sim(num_blocks=16, budget=8)
    a = sim.add(list(range(prompt_len)), max_tokens=3)
    b = sim.add(list(range(100, 103)), max_tokens=2)
    sim.step(abort_mid_step=a)
    assert a.is_finished and a.block_table == [] and a.num_computed_tokens == 0
    sim.run()
    assert b.finish_reason == "length"
    sim.assert_all_free()


# ---- prefill_first -------------------------------------------------------------------------------------------


def test_prefill_first_does_not_mix():
    sim = Sim(num_blocks=64, budget=16, policy="prefill_first")
    a = sim.add(list(range(5)), max_tokens=5)
    sim.step()
    b = sim.add(list(range(10, 16)), max_tokens=5)
    rec = sim.step()
    assert rec.batch.seqs == [b], "prefill_first: the admissible prefill runs alone"
    rec = sim.step()
    assert rec.batch.seqs == [a, b] and rec.batch.is_decode_only
    sim.run()
    assert_finished_whole(sim)


def test_mixed_policy_mixes():
    sim = Sim(num_blocks=64, budget=16, policy="mixed")
    a = sim.add(list(range(5)), max_tokens=5)
    sim.step()
    b = sim.add(list(range(10, 16)), max_tokens=5)
    rec = sim.step()
    assert rec.batch.seqs == [a, b] and rec.batch.num_new_tokens == [1, 6]
    sim.run()
    assert_finished_whole(sim)


# ---- randomized soak -----------------------------------------------------------------------------------------


def soak(seed: int, policy: str, chunked: bool = True, caching: bool = True, abort_rate: float = 0.0,
         num_seqs: int = 200) -> Sim:
    rng = random.Random(seed)
    bs = 4
    num_blocks = rng.randint(20, 60)
    budget = rng.randint(8, 64) if chunked else rng.randint(90, 128)  # without chunking: >= longest sequence
    sim = Sim(num_blocks=num_blocks, block_size=bs, max_num_seqs=rng.randint(1, 16), budget=budget,
              chunked=chunked, policy=policy, caching=caching)
    bases = [[rng.randrange(8) for _ in range(60)] for _ in range(4)]  # shared prefixes, small vocabulary
    specs = []
    for _ in range(num_seqs):
        n = rng.randint(1, 60)
        k = rng.randint(0, n) if rng.random() < 0.6 else 0
        prompt = rng.choice(bases)[:k] + [rng.randrange(8) for _ in range(n - k)]
        max_tokens = rng.randint(1, 30)
        # The engine rejects a request that cannot fit the whole pool (LLMEngine.add_request).
        max_tokens = min(max_tokens, num_blocks * bs - n)
        specs.append((prompt, max_tokens))
    specs.reverse()
    aborted: set[int] = set()
    for _ in range(20_000):
        for _ in range(rng.randint(0, 3)):
            if specs:
                sim.add(*specs.pop())
        if not sim.sched.has_unfinished():
            if not specs:
                break
            sim.add(*specs.pop())
        mid_step = None
        if abort_rate and rng.random() < abort_rate:
            live = sim.sched.running + list(sim.sched.waiting)
            victim = rng.choice(live)
            aborted.add(victim.seq_id)
            if rng.random() < 0.5 and victim in sim.sched.running:
                mid_step = victim
            else:
                sim.sched.finish(victim, "abort")
                sim.check_blocks()
                if not sim.sched.has_unfinished():
                    continue
        sim.step(abort_mid_step=mid_step)
    else:
        raise AssertionError("soak did not finish")
    assert len(sim.seqs) == num_seqs
    for s in sim.seqs:
        if s.seq_id in aborted:
            assert s.finish_reason == "abort"
            continue
        assert s.is_finished and s.finish_reason == "length", f"{s.request_id}: {s.status}"
        assert s.num_completion_tokens == s.sampling_params.max_tokens
        assert s.completion_token_ids == expected_completion(s)
    sim.assert_all_free()
    return sim


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
@pytest.mark.parametrize("seed", range(4))
def test_soak(seed, policy):
    sim = soak(seed, policy)
    assert sim.bm.num_cache_hits > 0, "the soak should exercise prefix-cache hits"


def test_soak_exercises_preemption():
    total = sum(soak(seed, "mixed").sched.num_preemptions for seed in range(4, 6))
    assert total > 0, "the soak should exercise preemption"


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
def test_soak_without_chunking(policy):
    soak(10, policy, chunked=False)


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
def test_soak_without_prefix_caching(policy):
    sim = soak(11, policy, caching=False)
    assert sim.bm.num_cache_hits == 0


@pytest.mark.parametrize("policy", ["mixed", "prefill_first"])
def test_soak_with_aborts(policy):
    soak(12, policy, abort_rate=0.05)
