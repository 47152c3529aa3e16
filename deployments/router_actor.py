"""The prefix router actor: the global prefix index of one application (RouterState behind Ray). Prefix-aware
routing on Ray Serve is three pieces, a module each, by the process each runs in:

    LLMServer replica (deployments/cache_event_publisher.py): engine core --KV cache events with each step's
        report--> CacheEventBuffer --publisher thread, every publish_period_s, fire and forget--> PrefixRouterActor
        (this module: named, detached, one per application: it outlives replica restarts)
    ingress process (deployments/request_router.py): PrefixAwareRequestRouter --pulls the changes every
        refresh_period_s, in the background--> its own IndexMirror; a routing decision is local Python: hash the
        token ids, match, rank.

The actor drops a replica's entries when a request router sees the replica die or leave (update_replicas,
on_replica_actor_died) or when it stays silent for replica_timeout_s. A replica's first report is a snapshot of
what it holds, so a (re)started replica replaces whatever the index had for it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import ray

from nanovllm_ray.router.state import RouterState

logger = logging.getLogger("ray.serve")

ROUTER_NAMESPACE = "nanovllm"


def router_actor_name(app_name: str) -> str:
    return f"prefix-router:{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class PrefixRouterActor:
    """The global prefix index of one application (RouterState behind Ray). Its methods are synchronous, so a
    caller's calls run in the order it made them. Detached, so that it outlives replica restarts; it ends
    itself once nothing has called it for idle_exit_s (the application was deleted: replicas heartbeat and
    request routers pull every fraction of a second while it runs)."""

    def __init__(self, replica_timeout_s: float = 30.0, idle_exit_s: float = 600.0) -> None:
        self.state = RouterState(replica_timeout_s=replica_timeout_s)
        self.idle_exit_s = idle_exit_s
        threading.Thread(target=self._exit_when_idle, name="idle-exit", daemon=True).start()

    def _exit_when_idle(self) -> None:
        while True:
            time.sleep(min(60.0, self.idle_exit_s / 4))
            if time.monotonic() - self.state.last_call > self.idle_exit_s:  # state's clock is time.monotonic
                logger.info("prefix router: no calls for %.0f s, exiting", self.idle_exit_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def report(self, replica: str, number: int, load: tuple[int, ...], stored: Sequence[int],
               removed: Sequence[int], snapshot: Sequence[int] | None) -> str:
        return self.state.report(replica, number, load, stored, removed, snapshot)

    def drop_replicas(self, replicas: list[str]) -> list[str]:
        dropped = self.state.drop_replicas(replicas)
        if dropped:
            logger.info("prefix router: dropped replicas %s and their cached blocks", dropped)
        return dropped

    def pull(self, epoch: str | None, since: int, router: str | None = None,
             router_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.state.pull(epoch, since, router, router_stats)

    def match(self, hashes: list[int]) -> dict[str, int]:
        return self.state.index.match(hashes)

    def stats(self) -> dict[str, Any]:
        return {**self.state.stats(), "actor_cpu_s": time.process_time()}


def get_router_actor(app_name: str, replica_timeout_s: float = 30.0):
    """The application's router actor, created by whoever asks first (a replica or a request router)."""
    # "DEFAULT": outside the caller's placement group. A replica's actors inherit its group, and the group goes
    # with the replica: the router actor would die with the first replica to be replaced.
    return PrefixRouterActor.options(name=router_actor_name(app_name), namespace=ROUTER_NAMESPACE,
                                     lifetime="detached", get_if_exists=True,
                                     scheduling_strategy="DEFAULT").remote(replica_timeout_s)
