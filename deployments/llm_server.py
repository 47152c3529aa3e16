"""The LLMServer deployment: one engine per replica, a thin client of its engine core.

The engine loop (scheduler, block manager, the model with one rank, or the driver of the rank actors) runs in an
EngineCoreActor of its own (nanovllm_ray/engine/core.py), placed in bundle 0 of this replica's placement group:
it shares no GIL with this replica's Serve event loop. The ingress calls `generate` through a DeploymentHandle
(token ids first: the request router sees them), so Serve routes, queues, counts and cancels requests as usual;
the tokens themselves go from the engine core to the ingress that asked, one message per engine step for all its
requests (a subscription). This replica keeps each request's admission, first and last output (metrics), the
engine's stats and its KV-cache events for the prefix router. Detokenizing is the ingress's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray import serve

from deployments.cache_event_publisher import CacheEventPublisher
from deployments.metrics import EngineMetrics
from nanovllm_ray import stages
from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import AsyncEngine, StepReport
from nanovllm_ray.engine.core import CoreRef, start_engine_core
from nanovllm_ray.engine.llm_engine import RequestError
from nanovllm_ray.engine.output import RequestOutput
from nanovllm_ray.router import CacheEventBuffer, PrefixRoutingConfig
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")

STATS_INTERVAL_S = 0.5  # engine gauges are recorded at most this often
EXIT_AFTER_ENGINE_DEATH_S = 1.0  # time for the failed requests' errors to reach their clients


@serve.deployment(max_ongoing_requests=256, max_queued_requests=512, health_check_period_s=10)
class LLMServer:
    def __init__(self, config: Config, served_model_name: str, core_num_cpus: float = 0.0,
                 core_num_gpus: float = 0.0, prefix_routing: dict[str, Any] | None = None) -> None:
        """config: the app's (built once by build_app); with prefix_routing it records KV-cache events, which this
        replica reports to the router actor."""
        try:
            ctx = serve.get_replica_context()
            replica, app = ctx.replica_id.unique_id, ctx.app_name
        except Exception:  # outside a replica (tests that build the class directly)
            replica, app = "local", "local"
        self.replica_id = replica
        self.core = start_engine_core(config, core_num_cpus, core_num_gpus)
        self.info = self.core.info
        self.ref = dataclasses.replace(self.core.ref, replica=replica)
        self.engine = AsyncEngine(self.core, on_report=self._on_report, on_dead=self._on_dead)
        self.metrics = EngineMetrics(served_model_name, replica)
        self.metrics.record_stats(self.engine.stats)
        self._last_stats = 0.0
        self.num_requests = self.num_aborted = 0
        self.num_adopted = 0  # requests the ingress added itself (its fast path)
        self.cache_events = CacheEventBuffer() if prefix_routing is not None else None
        self.publisher = None
        if self.cache_events is not None:
            self.publisher = CacheEventPublisher(app, replica, self.cache_events, self._load,
                                                 PrefixRoutingConfig.from_kwargs(**prefix_routing))
            self.publisher.start()
        logger.info("LLMServer %s: %s, tp=%d, engine core on %s, %d KV blocks", replica, config.model,
                    config.tensor_parallel_size, self.info["device"], self.info["num_blocks"])

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       subscriber: str | None = None, pin: str | None = None) -> AsyncIterator[RequestOutput | CoreRef]:
        """Stream one request's outputs. Raises RequestError (before any output) if the engine refuses it.
        Cancelling the call (a client gone away) aborts the request and frees its blocks.

        With a subscriber (an ingress replica), the outputs go from the engine core straight to that subscriber
        (its channel, engine/channel.py): this stream yields where to read them (a CoreRef) and ends when the
        request does; the call stays open as long as the request runs, so Serve's queue lengths and cancellation
        still hold. pin: this replica's id when the subscriber has already sent the add to its engine core (the
        ingress's fast path: the request router routes the call here and nowhere else); this call follows it."""
        arrival = time.monotonic()
        if stages.ENABLED:
            stages.stamp("server_in", request_id, arrival)
        if pin is not None and pin != self.replica_id:
            raise RuntimeError(f"request {request_id} was added on replica {pin}, not this one ({self.replica_id})")
        self.num_adopted += pin is not None
        first: float | None = None
        generated = 0
        reason = "abort"
        refused = False
        if subscriber is not None:
            yield self.ref
        try:
            async for out in self.engine.generate(request_id, prompt_token_ids, params, subscriber,
                                                  adopt=pin is not None):
                if first is None:
                    first = time.monotonic()
                generated = out.num_generated_tokens
                if out.finished:
                    reason = out.finish_reason
                if subscriber is None:
                    yield out
        except RequestError:
            refused = True
            raise
        finally:
            if not refused:
                self.num_requests += 1
                self.num_aborted += reason == "abort"
                self.metrics.record_request(reason, len(prompt_token_ids), generated, arrival, first,
                                            time.monotonic())

    def _on_report(self, report: StepReport) -> None:
        """Every engine step's report: cache events for the router; gauges at most every STATS_INTERVAL_S."""
        if self.cache_events is not None and report.kv_events:
            self.cache_events.add(report.kv_events)
        now = time.monotonic()
        if now - self._last_stats >= STATS_INTERVAL_S:
            self.metrics.record_stats(report.stats)
            self._last_stats = now

    async def stats(self) -> dict[str, Any]:
        """The engine's counters: running/waiting requests, KV blocks, prefix cache, steps."""
        return {**asdict(self.engine.stats), "num_blocks": self.info["num_blocks"],
                "num_steps": self.engine.num_steps, "num_requests": self.num_requests,
                "num_aborted": self.num_aborted, "num_adopted": self.num_adopted, "replica": self.replica_id}

    async def engine_timeline(self, since: float = 0.0) -> dict[str, Any]:
        """The engine loop's steps since `since` (benchmarks: where the engine's time went)."""
        return {"steps": await self.core.actor.timeline.remote(since), "replica": self.replica_id}

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router (RunningReplica.routing_stats)."""
        s = self.engine.stats
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "num_free_blocks": s.num_free_blocks}

    def _load(self) -> tuple[int, ...]:
        """What the publisher reports with the cache events (nanovllm_ray.router.ReplicaLoad)."""
        s = self.engine.stats
        return (s.num_running, s.num_waiting, s.num_free_blocks, self.info["num_blocks"], self.num_requests,
                s.prefix_cache_queries, s.prefix_cache_hits)

    def _on_dead(self, error: BaseException) -> None:
        """The engine died (its core actor, the loop, a rank): every request here has failed with a 503 naming
        the cause. Leave soon after, so that Serve starts a replacement at once; a failing health check would
        take health_check_period_s times three."""
        logger.error("LLMServer %s: %s; this replica exits in %.1f s to be replaced", self.replica_id, error,
                     EXIT_AFTER_ENGINE_DEATH_S)
        asyncio.get_running_loop().call_later(EXIT_AFTER_ENGINE_DEATH_S, self._exit)

    def _exit(self) -> None:
        import ray

        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception as e:  # outside a replica (tests that build the class directly)
            logger.warning("cannot end this replica: %r", e)

    async def check_engine(self) -> dict[str, Any]:
        """For the ingress's /health: raises EngineDeadError if this replica's engine is dead."""
        self.engine.check_health()
        return {"replica": self.replica_id, "num_steps": self.engine.num_steps}

    async def check_health(self) -> None:
        self.engine.check_health()

    def __del__(self) -> None:
        try:
            if self.publisher is not None:
                self.publisher.stop()
            self.engine.shutdown()
        except Exception:
            pass
