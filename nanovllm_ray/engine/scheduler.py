"""Continuous batching under a per-step token budget, with chunked prefill and preemption by recomputation.

The scheduler only moves Sequence objects and block ids. Each step it returns a list of (sequence, number of
tokens to compute); a sequence whose chunk reaches its last token gets a sampled token afterwards.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanovllm_ray.config import Config
from nanovllm_ray.engine.block_manager import BlockManager
from nanovllm_ray.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens to compute this step, per sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class Scheduler:
    def __init__(self, config: Config, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.prefill_first = config.scheduling_policy == "prefill_first"
        self.block_manager = block_manager
        self.max_model_len = config.max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        if self.prefill_first:
            # nano-vllm's policy: a step of prefills whenever one fits, otherwise a step of decodes.
            budget = self._schedule_running(batch, budget, prefills=True)
            self._schedule_waiting(batch, budget)
            if batch.seqs:
                return batch
            self._schedule_running(batch, budget, prefills=False)
            return batch
        # vLLM v1's policy: running sequences first (decodes and prefill chunks), then new ones, in one step.
        preempted_before = self.num_preemptions
        budget = self._schedule_running(batch, budget, prefills=None)
        if self.num_preemptions == preempted_before:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int, prefills: bool | None) -> int:
        """Schedule running sequences in admission order; prefills selects prefilling (True), decoding (False)
        or both (None)."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and seq.reaches_length_limit(self.max_model_len):
                i += 1  # finishes when its in-flight token arrives
                continue
            remaining = seq.num_uncomputed_tokens
            if prefills is not None and (remaining > 1) != prefills:
                i += 1
                continue
            num_new = min(remaining, budget)
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running.pop()  # never a scheduled one: those precede seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq, num_new)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
                continue
            break  # seq preempted itself: nothing after it is left
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while its last token was in flight: it resumes once the token arrives
            cached = self.block_manager.find_cached_prefix(seq)
            num_new = seq.num_tokens - len(cached) * self.block_manager.block_size
            if num_new > budget:
                if not self.chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.can_allocate(seq, cached, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, cached, num_new)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return budget

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it recomputes from scratch and resumes before any other waiting request."""
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Advance the computed-token counts of the batch and register newly full blocks for reuse."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # aborted while the step ran: its blocks are already freed
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (finished or aborted) and free everything it holds."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
