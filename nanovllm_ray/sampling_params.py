"""Per-request sampling parameters, with vLLM's names and checks that name the bad value.

Every value here ends up in a tensor or a comparison on the engine's loop, so each one is range-checked when the
params are made (and again when the engine takes a request): a request that gets past these checks cannot fail a
step for the requests batched with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOP_K_MAX = 2**31 - 1  # larger is the same as off (the vocabulary is smaller), and must still fit the tensor
MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: chosen + top k
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first value out of its range."""
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        _check_int("top_k", self.top_k)
        if not -1 <= self.top_k <= TOP_K_MAX:
            raise ValueError(f"top_k={self.top_k} must be -1 (off), 0 (off) or >= 1, and at most {TOP_K_MAX}")
        _check_int("max_tokens", self.max_tokens)
        if not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not INT64_MIN <= self.seed <= INT64_MAX:
                raise ValueError(f"seed={self.seed} must be in [{INT64_MIN}, {INT64_MAX}] (a 64-bit integer)")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t)
            if not 0 <= t <= INT64_MAX:
                raise ValueError(f"stop_token_ids: {t} is not a token id (>= 0)")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop strings must be strings")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
