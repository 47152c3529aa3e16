"""Which executor runs the ranks: decided here, from the Config alone (`executor`, `tensor_parallel_size`), as
vLLM's Executor.get_class(config) decides in one place. The engine, the Serve app and the batch job all say
LLMEngine(config) and get the executor this picks."""

from __future__ import annotations

from nanovllm_ray.config import Config
from nanovllm_ray.executor.base import Executor, InProcessExecutor


def make_executor(config: Config) -> Executor:
    """One rank in this process, or one Ray actor per rank (in the caller's placement group when it has one, as
    a Serve replica or a batch replica does; else a group of its own, and a local Ray instance if none runs)."""
    if not config.uses_rank_actors:
        return InProcessExecutor(config)
    from nanovllm_ray.executor.ray_executor import RayExecutor

    return RayExecutor(config)
