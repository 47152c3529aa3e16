"""A request as the scheduler sees it: token ids, progress, and the blocks that hold its KV."""

from __future__ import annotations

import time
from enum import Enum, auto
from itertools import count

from nanovllm_ray.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


PENDING = -1  # placeholder token id: sampled by a step still in flight (async scheduling)


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, token_ids: list[int], sampling_params: SamplingParams) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full, computed blocks, in order
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None  # the stop token id that ended it
        # (chosen token logprob, [(token id, logprob)] top-k) per generated token, when asked for
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_returned_tokens = 0  # generated tokens already handed to the caller by step()
        self.num_pending_tokens = 0  # trailing PENDING placeholders: sampled by a launched step, value unknown
        self.pending_row = -1  # row of the last placeholder in its step's sampled tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        """Generated tokens whose values are known (placeholders of in-flight steps excluded)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending_tokens]

    def reaches_length_limit(self, max_model_len: int) -> bool:
        """Counting in-flight tokens, seq has all the tokens it may have: scheduling it again would be waste."""
        return (self.num_completion_tokens >= self.sampling_params.max_tokens
                or len(self.token_ids) >= max_model_len)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
