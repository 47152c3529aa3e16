"""The offline API: LLM(model_dir, **config).generate(prompts, sampling_params), as in nano-vllm and vLLM."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from itertools import count
from typing import Any

from tqdm.auto import tqdm

from nanovllm_ray.config import Config
from nanovllm_ray.engine.llm_engine import LLMEngine
from nanovllm_ray.engine.output import GenerationOutput, OutputProcessor
from nanovllm_ray.sampling_params import SamplingParams
from nanovllm_ray.startup import show_startup_progress, startup_logger

Prompt = str | Seq[int]


class LLM:
    def __init__(self, model: str, **config: Any) -> None:
        t = time.perf_counter()
        show_startup_progress()
        self.config = Config.from_kwargs(model, **config)
        self.engine = LLMEngine(self.config)
        self._ids = count()
        self.startup_s = time.perf_counter() - t
        startup_logger.info("start-up: ready in %.1f s", self.startup_s)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

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
        # The same output path as the service and the batch job: text, stop strings and results, off the engine.
        proc = OutputProcessor(engine.tokenizer if any(sp.detokenize for sp in sampling_params) else None)
        order: dict[str, int] = {}
        prompt_ids: dict[str, list[int]] = {}
        try:
            for prompt, sp in zip(prompts, sampling_params):
                rid = f"gen-{next(self._ids)}"
                engine.add_request(rid, prompt, sp)
                order[rid] = len(order)
                prompt_ids[rid] = list(engine.get_sequence(rid).token_ids)
                proc.add(rid, sp, len(prompt_ids[rid]))
        except Exception:
            for rid in order:
                engine.abort_request(rid)
            raise
        results: dict[str, GenerationOutput] = {}
        bar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm or len(prompts) < 2)
        generated, t0 = 0, time.perf_counter()
        try:
            while proc.states:
                outputs = engine.step()
                generated += sum(len(o.new_token_ids) for o in outputs)
                finished, stopped = proc.process(outputs)
                for rid in stopped:  # a stop string ended it: free its blocks now
                    engine.abort_request(rid)
                for state in finished:
                    results[state.request_id] = GenerationOutput.from_state(state, prompt_ids[state.request_id])
                if finished:
                    bar.update(len(finished))
                    bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - t0):.0f}")
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return sorted(results.values(), key=lambda r: order[r.request_id])
