"""How the driver drives its ranks. The executor is the only place that knows whether ranks are in this
process or Ray actors; executor/factory.py picks one from the Config."""

from __future__ import annotations

from abc import ABC, abstractmethod

from nanovllm_ray.config import Config
from nanovllm_ray.executor.step import PendingOutput, StepInput, StepOutput


class Executor(ABC):
    num_kv_blocks: int
    block_bytes: int
    supports_async: bool = False  # execute_async overlaps the step with the driver's work, and takes pending tokens

    @abstractmethod
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step on every rank; rank 0's sampled tokens come back."""

    def execute_async(self, step: StepInput) -> PendingOutput:
        """Launch one step; the returned handle's result() waits for it."""
        return PendingOutput(self.execute(step))

    def shutdown(self) -> None:  # noqa: B027 (optional hook)
        pass


class InProcessExecutor(Executor):
    """One rank, in this process."""

    supports_async = True

    def __init__(self, config: Config) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs the Ray executor; the "
                             "in-process executor runs one rank")
        from nanovllm_ray.executor.model_runner import ModelRunner

        self.runner = ModelRunner(config)
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.block_bytes = self.runner.block_bytes
        self.device = self.runner.device

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def execute_async(self, step: StepInput) -> PendingOutput:
        return self.runner.execute_async(step)

    def measure_decode_graph(self, num_seqs: int, iters: int = 20, profile: bool = False) -> tuple[float, str]:
        return self.runner.measure_decode_graph(num_seqs, iters, profile)
