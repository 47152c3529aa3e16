"""The engine core as a Ray actor: the engine loop in a process of its own, driven by a thin client.

A Serve replica that ran the engine loop on a thread of its own process shared one GIL between the loop and
Serve's event loop and stream bookkeeping; under 256 streams the loop ran each step about 15 times slower. Here the
loop owns its process (and, with one rank, the model and the GPU). Commands come in with submit() (the add and
abort commands of one client event-loop turn, fire and forget); outputs go out through channels, each read with
read(channel): one long-poll call that returns everything the channel got since its last read, so one message per
engine step carries every request's news while the reader keeps up, and several steps' when it falls behind.

    CONTROL (the client, AsyncEngine): StepReports with each request's outputs; of a request added with a
        subscriber only its first and last (the client's bookkeeping: admission, metrics); the engine's stats at
        most every STATS_PERIOD_S; the KV-cache events
    a subscriber (an HTTP front end): every output of its requests, packed, straight from here
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
from nanovllm_ray.engine.async_engine import AsyncEngine, EngineDeadError, EngineLoop, StepReport
from nanovllm_ray.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

CONTROL = "control"  # the client's channel
STATS_PERIOD_S = 0.05  # a report that carries only stats goes to the client at most this often
READ_TIMEOUT_S = 5.0  # a read with nothing to return answers [] after this long
CHANNEL_TIMEOUT_S = 120.0  # what a channel holds is dropped once nobody has read it for this long


class _Channel:
    __slots__ = ("items", "event", "last_read")

    def __init__(self) -> None:
        self.items: list = []
        self.event: asyncio.Event | None = None  # made on the actor's loop by the first read that waits
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
        self._channels: dict[str, _Channel] = {}
        self._to_wake: set[str] = set()  # channels with news since the last wake-up ran on the loop
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._last_forward = 0.0
        self.loop = EngineLoop(self.engine, self._add_report, self._died)
        self.loop.start()

    def describe(self) -> dict[str, Any]:
        """What the client needs to know about this engine."""
        engine = self.engine
        return {"num_blocks": engine.block_manager.num_blocks, "stats": engine.stats(),
                "device": str(getattr(engine.executor, "device", "?"))}

    def submit(self, commands: list[tuple]) -> None:
        self.loop.submit(commands)

    async def read(self, channel: str, timeout_s: float = READ_TIMEOUT_S) -> list:
        """Everything `channel` got since its last read, in order; waits up to timeout_s for something, then
        returns []. Raises EngineDeadError once the engine loop has died and the channel is drained."""
        if self._aloop is None:  # the first read: from now on the engine thread wakes readers on this loop
            self._aloop = asyncio.get_running_loop()
            self._wake()  # (and forgets what it noted before)
        with self._lock:
            ch = self._channels.get(channel)
            if ch is None:
                ch = self._channels[channel] = _Channel()
        ch.last_read = time.monotonic()
        deadline = ch.last_read + timeout_s
        while True:
            with self._lock:
                items, ch.items = ch.items, []
            if items:
                return items
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop died: {type(self._dead).__name__}: {self._dead}")
            if ch.event is None:
                ch.event = asyncio.Event()
            try:
                await asyncio.wait_for(ch.event.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return []
            ch.event.clear()

    def timeline(self, since: float = 0.0) -> list[tuple]:
        return self.loop.timeline(since)

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.shutdown()

    # ---- the engine thread's side --------------------------------------------------------------------------

    def _add_report(self, report: StepReport) -> None:
        now = time.monotonic()
        idle = report.stats.num_running == 0 and report.stats.num_waiting == 0  # the last stats for a while
        forward = bool(report.outputs or report.kv_events) or idle or now - self._last_forward >= STATS_PERIOD_S
        with self._lock:
            wake = not self._to_wake  # else a wake-up is already on its way to the loop
            for name, items in report.by_subscriber.items():
                self._put(name, items)
            if forward:
                report.by_subscriber = {}
                self._put(CONTROL, [report])
                self._last_forward = now
            wake = wake and bool(self._to_wake)
        if wake and self._aloop is not None:  # else no read has come yet: the first one finds what is there
            self._aloop.call_soon_threadsafe(self._wake)

    def _put(self, name: str, items: list) -> None:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel()
        ch.items += items
        self._to_wake.add(name)

    def _wake(self) -> None:
        """On the actor's loop: wake the readers that have news; drop what readers gone for good left behind."""
        now = time.monotonic()
        with self._lock:
            names, self._to_wake = self._to_wake, set()
            for name in names:
                ch = self._channels[name]
                if now - ch.last_read > CHANNEL_TIMEOUT_S:
                    ch.items = []  # its reader is gone (an ingress replica that died)
                elif ch.event is not None:
                    ch.event.set()

    def _died(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
            self._to_wake.update(self._channels)
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._wake)


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
        """Read the control channel for as long as the engine lives; its death (the actor's: RayActorError, the
        loop's: EngineDeadError) goes to the client."""
        try:
            while True:
                for report in await self.actor.read.remote(CONTROL):
                    client.on_report(report)
        except asyncio.CancelledError:
            return
        except Exception as e:
            client.on_dead(e)

    def submit(self, cmds: list[tuple]) -> None:
        self.actor.submit.remote(cmds)

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
