"""The output path, one for every caller: the engine's token deltas become text, stop at a stop string, and add
up to what the caller returns.

LLMEngine.step() reports token ids only: its loop never detokenizes. A RequestState per request turns those
deltas into text incrementally (O(new tokens) with the tokenizers library's DecodeStream), cuts the text at a
stop string, and accumulates the result. LLM.generate (through OutputProcessor), each choice of an HTTP request
in the ingress, and each row of a batch job use the same class, so the three agree token for token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from nanovllm_ray.sampling_params import SamplingParams

# (chosen token's logprob, [(token id, logprob)] top-k) per generated token
Logprob = tuple[float, list[tuple[int, float]]]


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for one request after a step: the tokens sampled since its last report."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error; None while the request runs
    stop_reason: int | None = None  # the stop token id that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_logprobs: list[Logprob] | None = None  # when the request asked for logprobs
    error: str | None = None  # finish_reason "error": why the engine could not run this request
    num_generated_tokens: int = 0  # so far, this report's included

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # A plain tuple pickles ten times faster than a slotted dataclass: the engine core sends a step's outputs
    # as packed tuples (one message per step, all requests), the common case (a running request's new tokens)
    # as three fields.
    def pack(self) -> tuple:
        if self.finish_reason is None and self.new_logprobs is None and self.num_generated_tokens > len(
                self.new_token_ids):  # not its first report: the prompt and cache counts went with that one
            return (self.request_id, self.new_token_ids, self.num_generated_tokens)
        return (self.request_id, self.new_token_ids, self.num_generated_tokens, self.finish_reason, self.stop_reason,
                self.num_prompt_tokens, self.num_cached_tokens, self.new_logprobs, self.error)

    @classmethod
    def unpack(cls, t: tuple) -> RequestOutput:
        if len(t) == 3:
            return cls(t[0], t[1], num_generated_tokens=t[2])
        rid, ids, n, finish, stop, prompt, cached, lps, error = t
        return cls(rid, ids, finish, stop, prompt, cached, lps, error, n)

    @staticmethod
    def merge(outs: list[RequestOutput]) -> RequestOutput:
        """Consecutive reports of one request as one (what a stream item carries when its reader fell behind)."""
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        lps = None
        if any(o.new_logprobs is not None for o in outs):
            lps = [lp for o in outs for lp in (o.new_logprobs or ())]
        counts = next((o for o in outs if o.num_prompt_tokens), last)
        return RequestOutput(last.request_id, [t for o in outs for t in o.new_token_ids], last.finish_reason,
                             last.stop_reason, counts.num_prompt_tokens, counts.num_cached_tokens, lps, last.error,
                             last.num_generated_tokens)


class IncrementalDetokenizer:
    """Text of a growing list of token ids, O(new tokens) per call: the tokenizers library's DecodeStream, which
    holds back an incomplete UTF-8 character (a byte-level token that starts one) until the token that completes
    it arrives."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(self._backend, Tokenizer):
            raise TypeError(f"{type(tokenizer).__name__} has no Rust tokenizer (backend_tokenizer): incremental "
                            "detokenizing needs a fast tokenizer, as every Qwen3 checkpoint has")
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """The text that token_ids add."""
        return self._stream.step(self._backend, token_ids) or ""


@dataclass(slots=True)
class Delta:
    """What one update adds for the caller."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob]


class RequestState:
    """One request's output as its caller sees it: text (cut before a stop string), token ids, logprobs, finish
    reason and usage. `update` applies an engine output and returns what is new; once a stop string is found the
    state is finished with reason "stop" and `stopped_by_string` tells the caller to abort the engine request
    (tokens the engine sampled after it are dropped here)."""

    __slots__ = ("request_id", "params", "text", "token_ids", "logprobs", "finish_reason", "stop_reason", "error",
                 "num_prompt_tokens", "num_cached_tokens", "stopped_by_string", "_detok", "_max_stop", "_sent_chars",
                 "_sent_tokens")

    def __init__(self, request_id: str, params: SamplingParams, tokenizer, num_prompt_tokens: int = 0) -> None:
        self.request_id = request_id
        self.params = params
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.stopped_by_string = False
        self._detok = IncrementalDetokenizer(tokenizer) if params.detokenize and tokenizer is not None else None
        self._max_stop = max(map(len, params.stop), default=0) if self._detok is not None else 0
        self._sent_chars = 0
        self._sent_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    def update(self, out: RequestOutput) -> Delta | None:
        """Apply one engine output; the new text, token ids and logprobs (None once finished before it)."""
        if self.finished:
            return None  # sampled after a stop string, or a late report: dropped
        if out.num_prompt_tokens:
            self.num_prompt_tokens, self.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        ids = out.new_token_ids
        if self._max_stop:
            self._apply_checking_stops(ids, out.new_logprobs)
        else:
            self.token_ids += ids
            if out.new_logprobs:
                self.logprobs += out.new_logprobs
            if self._detok is not None and ids:
                self.text += self._detok.add(ids)
        if out.finished and not self.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
        end = len(self.text)
        if not self.finished and self._max_stop:
            end = max(self._sent_chars, end - (self._max_stop - 1))  # what may still become a stop string waits
        delta = Delta(self.text[self._sent_chars:end], self.token_ids[self._sent_tokens:],
                      self.logprobs[self._sent_tokens:] if self.logprobs else [])
        self._sent_chars, self._sent_tokens = end, len(self.token_ids)
        return delta

    def _apply_checking_stops(self, ids: list[int], logprobs: list[Logprob] | None) -> None:
        """Token by token, so that the tokens and text end exactly at the token that completes a stop string."""
        for i, t in enumerate(ids):
            self.token_ids.append(t)
            if logprobs:
                self.logprobs.append(logprobs[i])
            new = self._detok.add([t])
            if not new:
                continue
            start = max(0, len(self.text) - self._max_stop + 1)
            self.text += new
            hits = [(idx, s) for s in self.params.stop if (idx := self.text.find(s, start)) >= 0]
            if hits:
                idx, s = min(hits, key=lambda h: h[0])
                self.text = self.text[:idx]
                self.finish_reason, self.stop_reason, self.stopped_by_string = "stop", s, True
                return


class OutputProcessor:
    """RequestStates by request id, for callers that drive LLMEngine.step() themselves (LLM.generate, the batch
    job): engine outputs in; the requests that finished, and those a stop string ended (to abort), out."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, params: SamplingParams, num_prompt_tokens: int = 0) -> RequestState:
        state = self.states[request_id] = RequestState(request_id, params, self.tokenizer, num_prompt_tokens)
        return state

    def process(self, outputs: Iterable[RequestOutput]) -> tuple[list[RequestState], list[str]]:
        finished: list[RequestState] = []
        to_abort: list[str] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            state.update(out)
            if state.finished:
                del self.states[out.request_id]
                finished.append(state)
                if state.stopped_by_string and not out.finished:
                    to_abort.append(out.request_id)
        return finished, to_abort


@dataclass(slots=True)
class GenerationOutput:
    """LLM.generate's result for one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    logprobs: list[Logprob] = field(default_factory=list)
    stop_reason: int | str | None = None
    error: str | None = None  # finish_reason "error": why the engine could not finish it

    @classmethod
    def from_state(cls, state: RequestState, prompt_token_ids: list[int]) -> GenerationOutput:
        return cls(state.request_id, prompt_token_ids, state.text, state.token_ids, state.finish_reason,
                   state.num_prompt_tokens, state.num_cached_tokens, state.num_generated_tokens, state.logprobs,
                   state.stop_reason, state.error)
