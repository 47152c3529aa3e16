"""nanovllm_ray: a small, fast Qwen3 inference engine, served on Ray."""

from nanovllm_ray.caches import setup_caches

setup_caches()  # before torch is imported: where Triton, Inductor and (if need be) Python keep what they compile

_EXPORTS = {"LLM": "llm", "LLMEngine": "engine.llm_engine", "RequestError": "engine.llm_engine", "Config": "config",
            "ConfigError": "config", "SamplingParams": "sampling_params", "GenerationOutput": "engine.output",
            "RequestOutput": "engine.output", "RequestState": "engine.output", "OutputProcessor": "engine.output"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """The public names, imported on first use: a process that needs only part of the package (the HTTP ingress,
    the Serve app's build) does not import torch for it."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanovllm_ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"nanovllm_ray.{_EXPORTS[name]}"), name)
