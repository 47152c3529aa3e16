"""The LLMServer deployment: one engine per replica, the driver of its tensor-parallel ranks.

The engine (scheduler, block manager, detokenizer) runs in one background thread (serving/async_engine.py);
`generate` is an async generator that the ingress calls through a DeploymentHandle with token ids as its first
argument, and streams lists of RequestOutput deltas back. Ranks are in this process (one rank) or Ray actors in
this replica's placement group (RayExecutor): the executor decides, nothing here depends on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from ray import serve

from deployments.metrics import EngineMetrics
from deployments.router import CacheEventPublisher, EventReportingEngine
from nanovllm_ray.config import Config
from nanovllm_ray.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from nanovllm_ray.router import CacheEventBuffer, PrefixRoutingConfig
from nanovllm_ray.sampling_params import SamplingParams
from nanovllm_ray.serving.async_engine import AsyncEngine

logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=256, max_queued_requests=512, health_check_period_s=10)
class LLMServer:
    def __init__(self, model: str, engine_kwargs: dict[str, Any], served_model_name: str,
                 executor: str = "auto", dispatch: str = "compiled", worker_num_cpus: float = 1.0,
                 prefix_routing: dict[str, Any] | None = None) -> None:
        if prefix_routing is not None:  # the router actor's index is fed by this engine's cache events
            engine_kwargs = {**engine_kwargs, "enable_kv_cache_events": True}
        config = Config.from_kwargs(model, **engine_kwargs)
        use_ray = executor == "ray" or (executor == "auto" and config.tensor_parallel_size > 1)
        ex = None
        if use_ray:
            from nanovllm_ray.executor.ray_executor import RayExecutor

            ex = RayExecutor(config, dispatch=dispatch, worker_num_cpus=worker_num_cpus)
        self.cache_events = CacheEventBuffer() if prefix_routing is not None else None
        self.engine = (LLMEngine(config, executor=ex) if self.cache_events is None
                       else EventReportingEngine(config, executor=ex, on_events=self.cache_events.add))
        try:
            ctx = serve.get_replica_context()
            replica, app = ctx.replica_id.unique_id, ctx.app_name
        except Exception:  # outside a replica (tests that build the class directly)
            replica, app = "local", "local"
        self.replica_id = replica
        self.metrics = EngineMetrics(served_model_name, replica)
        self.async_engine = AsyncEngine(self.engine, on_stats=self.metrics.record_stats)
        self.metrics.record_stats(self.engine.stats())
        self.num_requests = self.num_aborted = 0
        self.publisher = None
        if self.cache_events is not None:
            self.publisher = CacheEventPublisher(app, replica, self.cache_events, self._load,
                                                 PrefixRoutingConfig.from_kwargs(**prefix_routing))
            self.publisher.start()
        logger.info("LLMServer %s: %s, tp=%d, %s executor, %d KV blocks", replica, model,
                    config.tensor_parallel_size, "ray" if use_ray else "in-process",
                    self.engine.block_manager.num_blocks)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[list[RequestOutput]]:
        """Stream one request's outputs. Raises RequestError (before any output) if the engine refuses it.
        Cancelling the call (a client gone away) aborts the request and frees its blocks."""
        arrival = time.monotonic()
        first: float | None = None
        last: RequestOutput | None = None
        refused = False
        try:
            async for outs in self.async_engine.generate(request_id, prompt_token_ids, params):
                if first is None:
                    first = time.monotonic()
                last = outs[-1]
                yield outs
        except RequestError:
            refused = True
            raise
        finally:
            if not refused:
                reason = last.finish_reason if last is not None and last.finished else "abort"
                self.num_requests += 1
                self.num_aborted += reason == "abort"
                self.metrics.record_request(reason, len(prompt_token_ids), last.num_generated_tokens if last else 0,
                                            arrival, first, time.monotonic())

    async def stats(self) -> dict[str, Any]:
        """The engine's counters: running/waiting requests, KV blocks, prefix cache, steps."""
        s = self.async_engine.stats()
        return {**asdict(s), "num_blocks": self.engine.block_manager.num_blocks,
                "num_steps": self.async_engine.num_steps, "num_requests": self.num_requests,
                "num_aborted": self.num_aborted, "replica": self.replica_id}

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router (RunningReplica.routing_stats)."""
        s = self.async_engine.stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "num_free_blocks": s.num_free_blocks}

    def _load(self) -> tuple[int, ...]:
        """What the publisher reports with the cache events (nanovllm_ray.router.ReplicaLoad)."""
        s = self.async_engine.stats()
        return (s.num_running, s.num_waiting, s.num_free_blocks, self.engine.block_manager.num_blocks,
                self.num_requests, s.prefix_cache_queries, s.prefix_cache_hits)

    def check_health(self) -> None:
        self.async_engine.check_health()

    def __del__(self) -> None:
        try:
            if self.publisher is not None:
                self.publisher.stop()
            self.async_engine.shutdown()
        except Exception:
            pass
