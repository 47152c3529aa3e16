"""The offline API: LLM(model_dir, **config).generate(prompts, sampling_params), as in nano-vllm and vLLM."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from tqdm.auto import tqdm

from nanovllm_ray.config import Config
from nanovllm_ray.engine.llm_engine import LLMEngine
from nanovllm_ray.sampling_params import SamplingParams

Prompt = str | Seq[int]


@dataclass(slots=True)
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    stop_reason: int | str | None = None


class LLM:
    def __init__(self, model: str, **config: Any) -> None:
        self.config = Config.from_kwargs(model, **config)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
                 = None, use_tqdm: bool = True) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or token ids
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        order: dict[str, int] = {}
        prompt_ids: dict[str, list[int]] = {}
        try:
            for prompt, sp in zip(prompts, sampling_params):
                rid = f"gen-{next(self._ids)}"
                engine.add_request(rid, prompt, sp)
                order[rid] = len(order)
                prompt_ids[rid] = list(engine.get_sequence(rid).token_ids)
        except Exception:
            for rid in order:
                engine.abort_request(rid)
            raise
        results: dict[str, GenerationOutput] = {}
        bar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm or len(prompts) < 2)
        generated, t0 = 0, time.perf_counter()
        pending = set(order)
        try:
            while pending:
                for out in engine.step():
                    generated += len(out.new_token_ids)
                    r = results.get(out.request_id)
                    if r is None:
                        r = results[out.request_id] = GenerationOutput(
                            out.request_id, prompt_ids[out.request_id], "", [], None, out.num_prompt_tokens,
                            out.num_cached_tokens, 0)
                    r.text += out.new_text
                    r.token_ids += out.new_token_ids
                    r.logprobs += out.new_logprobs
                    r.num_cached_tokens, r.num_generated_tokens = out.num_cached_tokens, out.num_generated_tokens
                    if out.finished:
                        r.finish_reason, r.stop_reason = out.finish_reason, out.stop_reason
                        pending.discard(out.request_id)
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - t0):.0f}")
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return sorted(results.values(), key=lambda r: order[r.request_id])
