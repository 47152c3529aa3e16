"""The rank actors' one-call-late protocol, without Ray: TPWorker.execute launches a step and returns the output of
the step launched before it; RayExecutor hands each step's output to the right PendingOutput, whether the driver
reads it after sending the next step (async scheduling), right away (sync: a flush call), or never before measuring
dispatch. The ranks here are TPWorker objects called in line, their runner a stand-in that labels each output."""

from __future__ import annotations

from collections import deque

import pytest

from nanovllm_ray.executor.ray_executor import RayExecutor
from nanovllm_ray.executor.step import PendingOutput, StepOutput
from nanovllm_ray.executor.worker import TPWorker


class LabelRunner:
    """Rank 0 returns [label] for the step labelled `label` (a step is its label here); other ranks return None."""

    def __init__(self, rank: int) -> None:
        self.rank, self.launched = rank, []

    def execute_async(self, step):
        self.launched.append(step)
        return PendingOutput(StepOutput([step])) if self.rank == 0 else None


class InlineDag:
    """A compiled graph stand-in: each call runs every rank's execute at once, in order; its refs are the values."""

    def __init__(self, workers: list[TPWorker]) -> None:
        self.workers, self.calls = workers, []

    def execute(self, step):
        self.calls.append(step)
        return [w.execute(step) for w in self.workers]


@pytest.fixture
def executor(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    workers = []
    for rank in range(2):
        w = TPWorker.__new__(TPWorker)
        w.rank, w.runner, w.pending = rank, LabelRunner(rank), None
        workers.append(w)
    ex = RayExecutor.__new__(RayExecutor)
    ex._dag, ex.workers = InlineDag(workers), workers
    ex._outstanding, ex._last = deque(), None
    yield ex
    ex.workers, ex._dag = [], None  # else __del__ would ray.kill them, and that call starts a local Ray


def test_async_order_reads_each_step_from_the_next_call(executor):
    """Async scheduling: launch t+1, then read t. One call per step; the last step's output needs one flush."""
    handles = [executor.execute_async(1)]
    outputs = []
    for step in range(2, 6):
        handles.append(executor.execute_async(step))
        outputs.append(handles[-2].result().token_ids)
    outputs.append(handles[-1].result().token_ids)
    assert outputs == [[1], [2], [3], [4], [5]]
    assert executor._dag.calls == [1, 2, 3, 4, 5, None]  # the flush comes only at the end
    assert [w.runner.launched for w in executor.workers] == [[1, 2, 3, 4, 5]] * 2
    assert all(w.pending is None for w in executor.workers)


def test_sync_order_flushes_every_step_and_a_run_after_it_starts_clean(executor):
    assert [executor.execute(s).token_ids for s in (1, 2, 3)] == [[1], [2], [3]]
    assert executor._dag.calls == [1, None, 2, None, 3, None]
    # Async again after sync: the first call after a flush carries nothing.
    a, b = executor.execute_async(4), executor.execute_async(5)
    assert b.result().token_ids == [5] and a.result().token_ids == [4]  # read out of order: both still right


def test_measure_dispatch_reads_what_the_ranks_hold_first(executor):
    handle = executor.execute_async(7)
    assert executor.measure_dispatch(n=3, warmup=1) >= 0
    assert handle.result().token_ids == [7]
    assert executor._dag.calls == [7, None, None, None, None, None]
    assert executor.execute_async(8).result().token_ids == [8]
