"""The driver: schedules, runs steps on the executor, applies sampled tokens and the token-level stop rules (EOS,
stop token ids, max_tokens, max_model_len).

Incremental API: add_request(), step() -> each request's new token ids (RequestOutput), abort_request(). Text,
stop strings and the accumulated result are the output path's (engine/output.py), off the engine's loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from nanovllm_ray.config import Config
from nanovllm_ray.engine.block_manager import BlockManager
from nanovllm_ray.engine.output import RequestOutput
from nanovllm_ray.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm_ray.engine.sequence import PENDING, Sequence, SequenceStatus
from nanovllm_ray.executor.base import Executor
from nanovllm_ray.executor.factory import make_executor
from nanovllm_ray.executor.step import PendingOutput, StepInput
from nanovllm_ray.kv_events import KVCacheEvent
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request a user sent cannot be served as asked: the message names the value and the limit."""


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class LLMEngine:
    def __init__(self, config: Config, executor: Executor | None = None, tokenizer=None) -> None:
        self.config = config
        self._tokenizer = tokenizer  # loaded on first use: an engine fed token ids never needs it
        self.executor = executor or make_executor(config)
        self.eos_token_ids = set(config.eos_token_ids)
        self.vocab_size = config.hf_config["vocab_size"]
        self.block_manager = BlockManager(self.executor.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching, config.enable_kv_cache_events)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.async_scheduling = config.async_scheduling and self.executor.supports_async
        self.inflight: tuple[list[Sequence], list[int], PendingOutput] | None = None  # launched, not applied
        self.num_failed_requests = 0  # requests a step could not run (error outputs); the loop went on
        self.last_batch = (0, 0)  # (sequences, tokens) of the last step scheduled
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", self.block_manager.num_blocks,
                    config.block_size, self.block_manager.num_blocks * config.block_size,
                    self.block_manager.num_blocks * self.executor.block_bytes / 2**30)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer or self.config.model)
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        assert self.config.max_model_len is not None
        return self.config.max_model_len

    # ---- requests ------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            try:
                return self.tokenizer.encode(prompt, add_special_tokens=False)
            except Exception as e:  # e.g. a lone surrogate: the tokenizer raises TypeError
                raise RequestError(f"prompt cannot be tokenized: {type(e).__name__}: {e}") from e
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | Seq[int], sampling_params: SamplingParams) -> None:
        """Queue a request. Raises RequestError, naming the value and the limit, for anything it cannot run: every
        value that becomes a tensor is range-checked here, so no request can fail a step for the others."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("prompt is empty: it has no tokens")
        bad = next((t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, which must "
                               "leave room for at least one generated token")
        self._check_params(sampling_params)
        longest = min(len(ids) + sampling_params.max_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.config.block_size
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise RequestError(f"prompt ({len(ids)} tokens) plus max_tokens ({sampling_params.max_tokens}) needs "
                               f"{longest} tokens of KV cache; the cache holds {capacity}")
        seq = Sequence(request_id, ids, sampling_params)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _check_params(self, p: SamplingParams) -> None:
        """SamplingParams checks its own ranges; this adds what needs the model (the vocabulary) and catches a
        params object changed after it was made."""
        try:
            p.check()
        except ValueError as e:
            raise RequestError(str(e)) from None
        bad = next((t for t in p.stop_token_ids if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"stop_token_ids: {bad!r} is outside the vocabulary [0, {self.vocab_size})")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.inflight is not None

    def get_sequence(self, request_id: str) -> Sequence | None:
        return self.requests.get(request_id)

    # ---- steps ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then apply the sampled tokens of the step before it (async scheduling:
        the driver's work overlaps the device's) or of this one (sync). Returns what changed per request.

        A step that cannot be built or launched for a reason tied to some of its requests (a value that does not
        fit its tensor) fails those requests (an error output each) and leaves the others to the next step; any
        other error propagates: the engine's state is then unknown."""
        batch = self.scheduler.schedule()
        self.last_batch = (len(batch.seqs), batch.num_tokens)
        launched = None
        failed: list[RequestOutput] = []
        if batch.seqs:
            try:
                step_input, sampled = self._build_step(batch)
                handle = (self.executor.execute_async(step_input) if self.async_scheduling
                          else PendingOutput(self.executor.execute(step_input)))
            except Exception as e:  # nothing was launched: the batch's state is as schedule() left it
                failed = self._fail_culprits(batch, e)
            else:
                # The device runs steps in order, so the driver may count this step's KV as computed already.
                self.scheduler.finish_step(batch)
                for row, seq in enumerate(sampled):
                    seq.token_ids.append(PENDING)
                    seq.num_pending_tokens += 1
                    seq.pending_row = row
                launched = (sampled, [len(s.token_ids) - 1 for s in sampled], handle)
        elif self.inflight is None and self.scheduler.has_unfinished():
            raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
        if not self.async_scheduling:
            return (self._apply(*launched) if launched else []) + failed
        outputs = self._apply(*self.inflight) if self.inflight else []
        self.inflight = launched
        if launched and all(seq.is_finished for seq in launched[0]):  # every request in it just stopped
            self._apply(*launched)
            self.inflight = None
        return outputs + failed

    def _fail_culprits(self, batch: ScheduledBatch, error: Exception) -> list[RequestOutput]:
        """Find the requests whose own step input cannot be built (checked one by one, on the host, as the runner
        converts it) and end them with an error; re-raise if none is to blame."""
        culprits = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            try:
                step, _ = self._build_step(ScheduledBatch([seq], [n]))
                step.check(self.vocab_size)
            except Exception as e:  # this request's own values are the cause
                culprits.append((seq, e))
        if not culprits:
            raise error
        outputs = []
        for seq, e in culprits:
            logger.error("request %s failed a step and was ended: %r", seq.request_id, e)
            self.scheduler.finish(seq, "error")
            self.requests.pop(seq.request_id, None)
            self.num_failed_requests += 1
            outputs.append(RequestOutput(seq.request_id, [], "error", None, seq.num_prompt_tokens,
                                         max(seq.num_cached_tokens, 0),
                                         error=f"the engine could not run this request: {type(e).__name__}: {e}"))
        return outputs

    def _build_step(self, batch: ScheduledBatch) -> tuple[StepInput, list[Sequence]]:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        rows: list[int] = []
        pending_dst: list[int] = []
        pending_src: list[int] = []
        sampled: list[Sequence] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            if seq.num_pending_tokens:  # at most one, the last: sampled by the step in flight
                assert seq.num_pending_tokens == 1 and end == seq.num_tokens
                pending_dst.append(len(input_ids) + n - 1)
                pending_src.append(seq.pending_row)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            if end == seq.num_tokens:
                rows.append(i)
                sampled.append(seq)
        params = [s.sampling_params for s in sampled]
        max_lp = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        step = StepInput(
            input_ids=input_ids, positions=positions, slot_mapping=slots, query_lens=list(batch.num_new_tokens),
            seq_lens=seq_lens, block_tables=[s.block_table for s in batch.seqs], sample_rows=rows,
            temperatures=[p.temperature for p in params], top_ks=[p.top_k for p in params],
            top_ps=[p.top_p for p in params], min_ps=[p.min_p for p in params], seeds=[p.seed for p in params],
            max_logprobs=max_lp, pending_dst=pending_dst, pending_src=pending_src)
        return step, sampled

    def _apply(self, sampled: list[Sequence], indices: list[int], handle: PendingOutput) -> list[RequestOutput]:
        out = handle.result()
        outputs = []
        now = time.monotonic()
        for i, (seq, index, token) in enumerate(zip(sampled, indices, out.token_ids)):
            if seq.is_finished:  # aborted, or stopped by the token before this one
                continue
            seq.token_ids[index] = token
            seq.num_pending_tokens -= 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            k = seq.sampling_params.logprobs
            if k is not None and out.logprobs is not None:
                top = list(zip(out.top_ids[i][:k], out.top_logprobs[i][:k])) if k > 0 and out.top_ids else []
                seq.logprobs.append((out.logprobs[i], top))
            self._check_stop(seq, token)
            outputs.append(self._report(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.sampling_params
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif (seq.num_completion_tokens - seq.num_pending_tokens >= p.max_tokens
              or seq.num_tokens - seq.num_pending_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if seq.num_pending_tokens:  # tokens sampled after this one by a step in flight: dropped
                del seq.token_ids[-seq.num_pending_tokens:]
                seq.num_pending_tokens = 0
            self.scheduler.finish(seq, reason)

    def _report(self, seq: Sequence) -> RequestOutput:
        known = len(seq.token_ids) - seq.num_pending_tokens
        start = seq.num_prompt_tokens + seq.num_returned_tokens
        new_lp = seq.logprobs[seq.num_returned_tokens:] if seq.sampling_params.logprobs is not None else None
        seq.num_returned_tokens = known - seq.num_prompt_tokens
        finished = seq.status == SequenceStatus.FINISHED
        if finished:
            self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.token_ids[start:known], seq.finish_reason if finished else None,
                             seq.stop_reason, seq.num_prompt_tokens, max(seq.num_cached_tokens, 0), new_lp,
                             num_generated_tokens=seq.num_returned_tokens)

    # ---- observability -------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_usage=bm.usage, num_free_blocks=bm.num_free_blocks,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=bm.num_cache_queries, prefix_cache_hits=bm.num_cache_hits)

    def take_kv_events(self) -> list[KVCacheEvent]:
        return self.block_manager.take_events()

    def shutdown(self) -> None:
        self.executor.shutdown()


def load_tokenizer(path: str):
    """The checkpoint's tokenizer: the class its tokenizer_config.json names, straight from transformers where it
    has it, else AutoTokenizer. AutoTokenizer reads the model's config code first, which imports torch: 3-4 s of the
    HTTP ingress's start (2-core machine), a process that needs no torch."""
    import transformers

    cls = _named_tokenizer_class(path) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/... for a missing or broken tokenizer
        raise RuntimeError(f"cannot load a tokenizer from {path!r}: {e}") from e


def _named_tokenizer_class(path: str):
    """transformers' class of the name tokenizer_config.json gives; None where there is none (AutoTokenizer then)."""
    import transformers

    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return getattr(transformers, json.load(f)["tokenizer_class"])
    except Exception:  # no such file or key, or a class transformers lacks
        return None


__all__ = ["LLMEngine", "RequestOutput", "RequestError", "EngineStats", "SequenceStatus"]
