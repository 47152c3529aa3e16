"""From an OpenAI request to what the engine takes: token ids per choice (the tokenizer and the checkpoint's
chat template) and SamplingParams, checked against the served model's limits. Every refusal is an OpenAIError
that names the parameter, the value and the limit."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from nanovllm_ray.sampling_params import SamplingParams
from nanovllm_ray.serving.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

MAX_LOGPROBS = 20
SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass(slots=True)
class Choice:
    """One generation the engine runs: choice `index` of the response."""

    index: int
    prompt_index: int  # which prompt of the request (n > 1 gives several choices per prompt)
    prompt_token_ids: list[int]
    params: SamplingParams


class RequestProcessor:
    def __init__(self, tokenizer, model_name: str, max_model_len: int, vocab_size: int,
                 max_prompts_per_request: int = 64, default_max_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_prompts_per_request = max_prompts_per_request
        self.default_max_tokens = default_max_tokens

    # ---- public --------------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                              status=404, param="model", code="model_not_found")

    def completion(self, req: CompletionRequest) -> list[Choice]:
        self.check_model(req.model)
        if req.echo:
            raise OpenAIError("echo is not supported", param="echo")
        prompts = self._completion_prompts(req.prompt)
        self._check_count(len(prompts), req.n)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(f"logprobs={req.logprobs} must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        choices = []
        for i, ids in enumerate(prompts):
            params = self._params(req, ids, req.max_tokens, req.logprobs)
            choices += self._fan_out(i, req.n, ids, params)
        return choices

    def chat(self, req: ChatCompletionRequest) -> list[Choice]:
        self.check_model(req.model)
        if not req.messages:
            raise OpenAIError("messages must not be empty", param="messages")
        self._check_count(1, req.n)
        ids = self.tokenize(self.render_chat(req), param="messages")
        logprobs = None
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(f"top_logprobs={req.top_logprobs} must be in [0, {MAX_LOGPROBS}]",
                                  param="top_logprobs")
        if req.logprobs:
            logprobs = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        return self._fan_out(0, req.n, ids, self._params(req, ids, max_tokens, logprobs, param))

    def render_chat(self, req: ChatCompletionRequest) -> str:
        messages = []
        for m in req.messages:
            msg = m.model_dump(exclude_none=True)
            msg["content"] = m.text()
            messages.append(msg)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt,
                                                      **(req.chat_template_kwargs or {}))
        except Exception as e:  # jinja2 raises TemplateError (and others) for messages it cannot render
            raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e

    def tokenize(self, text: str, param: str = "prompt") -> list[int]:
        if not text:
            raise OpenAIError("prompt is empty", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud800" alone; no tokenizer can take it
            raise OpenAIError(f"{param} is not valid Unicode: {e.reason} at character {e.start} "
                              f"({text[e.start:e.end]!a})", param=param) from None
        # As the offline engine does: the chat template or the caller places any special tokens.
        try:
            return self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:  # whatever else the tokenizer refuses: this request's fault, not the server's
            raise OpenAIError(f"{param} cannot be tokenized: {type(e).__name__}: {e}", param=param) from e

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- checks --------------------------------------------------------------------------------------------

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenize(prompt)]
        if not prompt:
            raise OpenAIError("prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [self._check_ids(prompt)]
        if len(prompt) > self.max_prompts_per_request:
            raise OpenAIError(f"{len(prompt)} prompts in one request; the limit is {self.max_prompts_per_request}",
                              param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(self.tokenize(p))
            elif not p:
                raise OpenAIError("prompt is empty", param="prompt")
            else:
                out.append(self._check_ids(p))
        return out

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return list(ids)

    def _check_count(self, num_prompts: int, n: int) -> None:
        if n < 1:
            raise OpenAIError(f"n={n} must be >= 1", param="n")
        if num_prompts * n > self.max_prompts_per_request:
            raise OpenAIError(f"{num_prompts} prompts x n={n} = {num_prompts * n} generations in one request; the "
                              f"limit is {self.max_prompts_per_request}", param="n" if n > 1 else "prompt")

    def _params(self, req, ids: list[int], max_tokens: int | None, logprobs: int | None,
                max_tokens_param: str = "max_tokens") -> SamplingParams:
        limit = self.max_model_len
        if len(ids) >= limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                              f"{len(ids)} tokens, which leaves no room for a completion.", param="prompt",
                              code="context_length_exceeded")
        if max_tokens is None:  # as much as fits, or the server's default cap
            max_tokens = limit - len(ids)
            if self.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.default_max_tokens)
        elif max_tokens < 1:
            raise OpenAIError(f"{max_tokens_param}={max_tokens} must be >= 1", param=max_tokens_param)
        elif max_tokens > limit:
            raise OpenAIError(f"{max_tokens_param}={max_tokens} is above this model's maximum context length "
                              f"({limit})", param=max_tokens_param)
        elif len(ids) + max_tokens > limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                              "completion). Please reduce the prompt or max_tokens.", param=max_tokens_param,
                              code="context_length_exceeded")
        if req.temperature < 0:
            raise OpenAIError(f"temperature={req.temperature} must be >= 0", param="temperature")
        if not 0.0 < req.top_p <= 1.0:
            raise OpenAIError(f"top_p={req.top_p} must be in (0, 1]", param="top_p")
        if req.top_k < -1:
            raise OpenAIError(f"top_k={req.top_k} must be -1 (off), 0 (off) or >= 1", param="top_k")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        bad = next((t for t in req.stop_token_ids or () if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"stop_token_ids: {bad} is outside the vocabulary [0, {self.vocab_size})",
                              param="stop_token_ids")
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=stop,
                                  stop_token_ids=list(req.stop_token_ids or []), seed=req.seed, logprobs=logprobs)
        except ValueError as e:  # SamplingParams names the field first: "top_k=... must be ..."
            name = str(e).split("=")[0].split(":")[0]
            raise OpenAIError(str(e), param=name if name in SAMPLING_FIELDS else None) from e

    @staticmethod
    def _fan_out(prompt_index: int, n: int, ids: list[int], params: SamplingParams) -> list[Choice]:
        # As vLLM does for n > 1: a seeded request's i-th sample gets seed + i, so the samples differ.
        return [Choice(prompt_index * n + j, prompt_index, ids,
                       params if params.seed is None or j == 0 else replace(params, seed=params.seed + j))
                for j in range(n)]
