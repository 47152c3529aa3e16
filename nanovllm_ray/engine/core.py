"""The engine core as a Ray actor: the engine loop in a process of its own, driven by a thin client.

A Serve replica that ran the engine loop on a thread of its own process shared one GIL between the loop and
Serve's event loops and stream bookkeeping; under 256 streams the loop ran each step about 15 times slower. Here the
loop owns its process (and, with one rank, the model and the GPU). Its clients talk to it over TCP (engine/channel.py,
whose threads wait outside the GIL), not Ray calls: commands (add, abort) come in as they are sent, and each channel
goes out as one frame per wake-up with everything it got since the last, so one frame per engine step carries every
request's news while the reader keeps up, and several steps' when it falls behind.

    CONTROL (the client, AsyncEngine): StepReports with each request's outputs; of a request added with a
        subscriber only its first and last (the client's bookkeeping: admission, metrics); the engine's stats at
        most every STATS_PERIOD_S; the KV-cache events
    a subscriber (an HTTP front end): every output of its requests, packed, straight from here

Ray carries only the start (describe: where to connect, with which token), benchmarks' timelines and the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from nanovllm_ray import stages
from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import AsyncEngine, EngineLoop, StepReport
from nanovllm_ray.engine.channel import ChannelClient, ChannelServer
from nanovllm_ray.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

CONTROL = "control"  # the client's channel
STATS_PERIOD_S = 0.05  # a report that carries only stats goes to the client at most this often


class EngineCoreActor:
    """Made a Ray actor by start_engine_core(); host: the address its clients reach it at (its node's)."""

    def __init__(self, config: Config, host: str = "127.0.0.1") -> None:
        # The engine thread holds the GIL for most of a busy step; the channel's threads wait for it. Hand it over
        # after 1 ms rather than the default 5 ms: each token's way out passes this point.
        sys.setswitchinterval(0.001)
        self.engine = LLMEngine(config)
        self._last_forward = 0.0
        self.loop = EngineLoop(self.engine, self._add_report, self._died)
        self.server = ChannelServer(host, self.loop.submit)
        self.loop.start()

    def describe(self) -> dict[str, Any]:
        """What the client needs to know about this engine, and where its channels are."""
        engine = self.engine
        return {"num_blocks": engine.block_manager.num_blocks, "stats": engine.stats(),
                "device": str(getattr(engine.executor, "device", "?")), "address": self.server.address,
                "token": self.server.token}

    def timeline(self, since: float = 0.0) -> list[tuple]:
        return self.loop.timeline(since)

    def shutdown(self) -> None:
        self.loop.stop()
        self.server.close()
        self.engine.shutdown()

    # ---- the engine thread's side --------------------------------------------------------------------------

    def _add_report(self, report: StepReport) -> None:
        now = time.monotonic()
        idle = report.stats.num_running == 0 and report.stats.num_waiting == 0  # the last stats for a while
        forward = bool(report.outputs or report.kv_events) or idle or now - self._last_forward >= STATS_PERIOD_S
        for name, items in report.by_subscriber.items():
            self.server.put(name, items)
        if forward:
            report.by_subscriber = {}
            self.server.put(CONTROL, [report])
            self._last_forward = now

    def _died(self, error: BaseException) -> None:
        self.server.fail(f"the engine loop died: {type(error).__name__}: {error}")


@dataclass(frozen=True, slots=True)
class CoreRef:
    """Where a subscriber reads its requests' outputs: the engine core actor, its channel server and token."""

    core_id: str
    actor: Any
    address: tuple[str, int]
    token: bytes
    replica: str = ""  # the LLMServer replica that drives it (Serve's unique id), where there is one

    async def connect(self, channel: str | None) -> ChannelClient:
        return await ChannelClient.connect(self.address, self.token, channel)


class RemoteCore:
    """The client's end of an EngineCoreActor (what AsyncEngine calls its core)."""

    def __init__(self, actor, info: dict[str, Any]) -> None:
        self.actor = actor
        self.info = info
        self.ref = CoreRef(actor._actor_id.hex(), actor, tuple(info["address"]), info["token"])
        self.initial_stats = info["stats"]
        self._task: asyncio.Task | None = None
        self._conn: ChannelClient | None = None
        self._pending: list[tuple] = []  # commands sent before the connection was up

    def start(self, client: AsyncEngine) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume(client))

    async def _consume(self, client: AsyncEngine) -> None:
        """Read the control channel for as long as the engine lives; its death (the loop's, or the actor's: the
        connection ends) goes to the client."""
        try:
            conn = await self.ref.connect(CONTROL)
            if self._pending:
                conn.send(self._pending)
                self._pending = []
            self._conn = conn
            while True:
                for report in await conn.recv():
                    client.on_report(report)
        except asyncio.CancelledError:
            return
        except Exception as e:  # AsyncEngine.on_dead makes it an EngineDeadError naming the cause
            client.on_dead(e)

    def submit(self, cmds: list[tuple]) -> None:
        if stages.ENABLED:
            for c in cmds:
                if c[0] == "add":
                    stages.stamp("server_add", c[1])
        if self._conn is None:
            self._pending += cmds
        else:
            self._conn.send(cmds)

    def shutdown(self) -> None:
        import ray

        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            self._conn.close()
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
    actor = ray.remote(EngineCoreActor).options(**options).remote(config, ray.util.get_node_ip_address())
    try:
        info = ray.get(actor.describe.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return RemoteCore(actor, info)
