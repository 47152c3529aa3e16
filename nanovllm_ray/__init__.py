"""nanovllm_ray: a small, fast Qwen3 inference engine, served on Ray."""

from nanovllm_ray.caches import setup_caches

setup_caches()  # before torch is imported: where Triton, Inductor and (if need be) Python keep what they compile

# ruff: noqa: E402
from nanovllm_ray.config import Config, ConfigError
from nanovllm_ray.engine.llm_engine import LLMEngine, RequestError
from nanovllm_ray.engine.output import GenerationOutput, OutputProcessor, RequestOutput, RequestState
from nanovllm_ray.llm import LLM
from nanovllm_ray.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "Config", "ConfigError", "SamplingParams", "GenerationOutput", "RequestOutput",
           "RequestError", "RequestState", "OutputProcessor"]
