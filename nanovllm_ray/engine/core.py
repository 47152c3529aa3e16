"""The engine core as a Ray actor: the engine loop in a process of its own, driven by a thin client.

A Serve replica that ran the engine loop on a thread of its own process shared one GIL between the loop and
Serve's event loop and stream bookkeeping; under 256 streams the loop ran each step about 15 times slower. Here the
loop owns its process (and, with one rank, the model and the GPU), and talks to its client in two channels:

    client --submit([add/abort commands of one event-loop turn]), fire and forget--> EngineCoreActor
    client <--one long-lived streaming call, reports(): each item is every StepReport since the last-- actor

so one message per engine step carries every request's new tokens, and the client (AsyncEngine) fans them out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import AsyncEngine, EngineDeadError, EngineLoop, StepReport, describe
from nanovllm_ray.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class EngineCoreActor:
    """Made a Ray actor by start_engine_core(). Its methods run on the actor's asyncio loop; the engine on the
    EngineLoop's thread."""

    def __init__(self, config: Config, executor: str = "auto", dispatch: str = "compiled",
                 worker_num_cpus: float = 1.0) -> None:
        from nanovllm_ray.executor.base import make_executor

        self.engine = LLMEngine(config, executor=make_executor(config, executor, dispatch, worker_num_cpus))
        self._lock = threading.Lock()
        self._pending: list[StepReport] = []
        self._dead: BaseException | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._signalled = False
        self.loop = EngineLoop(self.engine, self._add_report, self._died)
        self.loop.start()

    def describe(self) -> dict[str, Any]:
        return describe(self.engine)

    def submit(self, commands: list[tuple]) -> None:
        self.loop.submit(commands)

    async def reports(self):
        """Stream every StepReport, as lists of those made since the last item; ends by raising when the engine
        loop dies."""
        self._aloop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                batch, self._pending, self._signalled = self._pending, [], False
                dead = self._dead
            if batch:
                yield batch
            elif dead is not None:
                raise EngineDeadError(f"the engine loop died: {type(dead).__name__}: {dead}")
            else:
                await self._wakeup.wait()
                self._wakeup.clear()

    def ping(self) -> int:
        """The number of steps so far; raises if the engine loop is dead."""
        if not self.loop.alive:
            raise EngineDeadError(f"the engine loop is not running: {self.loop.error!r}")
        return self.loop.num_steps

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()

    # ---- the engine thread's side --------------------------------------------------------------------------

    def _add_report(self, report: StepReport) -> None:
        with self._lock:
            self._pending.append(report)
            signal, self._signalled = not self._signalled, True
        if signal:
            self._signal()

    def _died(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
        self._signal()

    def _signal(self) -> None:
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._wakeup.set)


class RemoteCore:
    """The client's end of an EngineCoreActor (what AsyncEngine calls its core)."""

    def __init__(self, actor, info: dict[str, Any]) -> None:
        self.actor = actor
        self.info = info
        self.initial_stats = info["stats"]
        self._task: asyncio.Task | None = None

    def start(self, client: AsyncEngine) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume(client))

    async def _consume(self, client: AsyncEngine) -> None:
        try:
            # Backpressure: at most two items unread; meanwhile the actor gathers reports into its next item.
            gen = self.actor.reports.options(num_returns="streaming",
                                             _generator_backpressure_num_objects=2).remote()
            async for ref in gen:
                for report in await ref:
                    client.on_report(report)
            error: BaseException = EngineDeadError("the engine core's report stream ended")
        except asyncio.CancelledError:
            return
        except Exception as e:  # the actor died (RayActorError) or its loop did (RayTaskError)
            error = e
        client.on_dead(error)

    def submit(self, cmds: list[tuple]) -> None:
        self.actor.submit.remote(cmds)

    async def ping(self, timeout_s: float) -> int:
        return await asyncio.wait_for(self.actor.ping.remote(), timeout_s)

    def shutdown(self) -> None:
        import ray

        if self._task is not None:
            self._task.cancel()
        try:
            ray.kill(self.actor)  # its rank actors go with it
        except Exception:  # already gone
            pass


def start_engine_core(config: Config, executor: str = "auto", dispatch: str = "compiled",
                      worker_num_cpus: float = 1.0, num_cpus: float = 0.0, num_gpus: float = 0.0,
                      timeout_s: float = 1800.0) -> RemoteCore:
    """Start an EngineCoreActor in bundle 0 of the caller's placement group (a Serve replica's: the actor and the
    rank actors it makes inherit it) or wherever it fits; wait until its engine is ready."""
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
    actor = ray.remote(EngineCoreActor).options(**options).remote(config, executor, dispatch, worker_num_cpus)
    try:
        info = ray.get(actor.describe.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return RemoteCore(actor, info)
