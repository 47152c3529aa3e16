"""The engine core as a Ray actor: the engine loop in a process of its own, driven by a thin client.

A Serve replica that ran the engine loop on a thread of its own process shared one GIL between the loop and
Serve's event loop and stream bookkeeping; under 256 streams the loop ran each step about 15 times slower. Here the
loop owns its process (and, with one rank, the model and the GPU), and talks to its client in two channels:

    client --submit([add/abort commands of one event-loop turn]), fire and forget--> EngineCoreActor
    client <--one long-lived streaming call, reports(): each item is every StepReport since the last-- actor

so one message per engine step carries every request's new tokens, and the client (AsyncEngine) fans them out.

A third channel takes the token stream off the client's process altogether: a request added with a subscriber
(an HTTP front end) has all its outputs kept for that subscriber, which reads them with read(): one long-poll
call that returns every output since its last one, for all its requests. The client's stream then carries only
each such request's first and last output (its bookkeeping: admission, metrics), the engine's stats at most
every STATS_PERIOD_S, and the KV-cache events.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import AsyncEngine, EngineDeadError, EngineLoop, StepReport, describe
from nanovllm_ray.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.05  # a report that carries only stats goes to the client at most this often
SUBSCRIBER_TIMEOUT_S = 120.0  # outputs of a subscriber that has not read for this long are dropped


class _Subscriber:
    __slots__ = ("items", "event", "last_read")

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.event: asyncio.Event | None = None
        self.last_read = time.monotonic()


class EngineCoreActor:
    """Made a Ray actor by start_engine_core(). Its methods run on the actor's asyncio loop; the engine on the
    EngineLoop's thread."""

    def __init__(self, config: Config) -> None:
        # The engine thread holds the GIL for most of a busy step; the actor's loop (commands in, reads out) and
        # Ray's threads wait for it. Hand it over after 1 ms rather than the default 5 ms: each token's way out
        # passes this point.
        sys.setswitchinterval(0.001)
        self.engine = LLMEngine(config)
        self._lock = threading.Lock()
        self._pending: list[StepReport] = []
        self._dead: BaseException | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._signalled = False
        self._last_forward = 0.0
        self._subs: dict[str, _Subscriber] = {}
        self._to_wake: set[str] = set()
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

    async def read(self, subscriber: str, timeout_s: float = 5.0) -> list[tuple]:
        """Every output of `subscriber`'s requests since its last read (packed RequestOutputs, in order); waits
        up to timeout_s for one, then returns [] (the caller checks the engine and reads again)."""
        self._aloop = self._aloop or asyncio.get_running_loop()
        with self._lock:
            sub = self._subs.get(subscriber)
            if sub is None:
                sub = self._subs[subscriber] = _Subscriber()
        sub.last_read = time.monotonic()
        deadline = sub.last_read + timeout_s
        while True:
            with self._lock:
                items, sub.items = sub.items, []
            if items:
                return items
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop died: {type(self._dead).__name__}: {self._dead}")
            if sub.event is None:
                sub.event = asyncio.Event()
            try:
                await asyncio.wait_for(sub.event.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return []
            sub.event.clear()

    def ping(self) -> int:
        """The number of steps so far; raises if the engine loop is dead."""
        if not self.loop.alive:
            raise EngineDeadError(f"the engine loop is not running: {self.loop.error!r}")
        return self.loop.num_steps

    def timeline(self, since: float = 0.0) -> dict[str, Any]:
        return self.loop.timeline(since)

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()

    # ---- the engine thread's side --------------------------------------------------------------------------

    def _add_report(self, report: StepReport) -> None:
        now = time.monotonic()
        idle = report.stats.num_running == 0 and report.stats.num_waiting == 0  # the last stats for a while
        forward = bool(report.outputs or report.kv_events) or idle or now - self._last_forward >= STATS_PERIOD_S
        wake = False
        with self._lock:
            for name, items in report.by_subscriber.items():
                sub = self._subs.get(name)
                if sub is None:
                    sub = self._subs[name] = _Subscriber()
                sub.items += items
                if self._aloop is not None:  # else no reader has come yet: its first read takes these
                    wake = wake or not self._to_wake  # a wake-up is not already on its way
                    self._to_wake.add(name)
            signal = False
            if forward:
                report.by_subscriber = {}
                self._pending.append(report)
                self._last_forward = now
                signal, self._signalled = not self._signalled, True
        if wake and self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._wake_subscribers)
        if signal:
            self._signal()

    def _wake_subscribers(self) -> None:
        """On the actor's loop: wake the readers that have news; drop what readers gone for good left behind."""
        now = time.monotonic()
        with self._lock:
            names, self._to_wake = self._to_wake, set()
            for name in names:
                sub = self._subs[name]
                if now - sub.last_read > SUBSCRIBER_TIMEOUT_S:
                    sub.items = []  # its reader is gone (an ingress replica that died)
                elif sub.event is not None:
                    sub.event.set()

    def _died(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
            names = list(self._subs)
            self._to_wake.update(names)
        self._signal()
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._wake_subscribers)

    def _signal(self) -> None:
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._wakeup.set)


@dataclass(frozen=True, slots=True)
class CoreRef:
    """Where a subscriber reads its requests' outputs: the engine core actor, and a name for it."""

    core_id: str
    actor: Any


class RemoteCore:
    """The client's end of an EngineCoreActor (what AsyncEngine calls its core)."""

    def __init__(self, actor, info: dict[str, Any]) -> None:
        self.actor = actor
        self.info = info
        self.ref = CoreRef(actor._actor_id.hex(), actor)
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


def start_engine_core(config: Config, num_cpus: float = 0.0, num_gpus: float = 0.0,
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
    actor = ray.remote(EngineCoreActor).options(**options).remote(config)
    try:
        info = ray.get(actor.describe.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return RemoteCore(actor, info)
