"""Prefix-aware routing on Ray Serve: the router actor, the replicas' cache-event publisher, and the RequestRouter
that the ingress's handle to the LLMServer uses.

    LLMServer replica: engine core --KV cache events with each step's report--> CacheEventBuffer
        --publisher thread, every publish_period_s, fire and forget--> PrefixRouterActor (named, detached, one
        per application: it outlives replica restarts)
    ingress process: PrefixAwareRequestRouter --pulls the changes every refresh_period_s, in the background-->
        its own IndexMirror; a routing decision is local Python: hash the token ids, match, rank.

The actor drops a replica's entries when a request router sees the replica die or leave (update_replicas,
on_replica_actor_died) or when it stays silent for replica_timeout_s. A replica's first report is a snapshot of
what it holds, so a (re)started replica replaces whatever the index had for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from nanovllm_ray.engine.block_hash import prefix_block_hashes
from nanovllm_ray.router.events import CacheEventBuffer
from nanovllm_ray.router.policy import DecayingCount, PrefixRoutingConfig, decide
from nanovllm_ray.router.state import DROPPED, RESYNC, IndexMirror, RouterState

logger = logging.getLogger("ray.serve")

ROUTER_NAMESPACE = "nanovllm"
REQUEST_ROUTER_CLASS = "deployments.router:PrefixAwareRequestRouter"


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


def prefix_request_router_config(block_size: int, routing_kwargs: dict[str, Any]) -> RequestRouterConfig:
    """The LLMServer deployment's request_router_config for prefix-aware routing."""
    config = PrefixRoutingConfig.from_kwargs(**routing_kwargs)
    return RequestRouterConfig(request_router_class=REQUEST_ROUTER_CLASS,
                               request_router_kwargs={"block_size": block_size, **config.to_dict()},
                               request_routing_stats_period_s=2.0)


# ---- the replica's side ------------------------------------------------------------------------------------


class CacheEventPublisher:
    """A thread that sends the replica's buffered cache events (and its load) to the router actor with
    non-blocking calls: every publish_period_s when something changed, every heartbeat_period_s regardless.
    At most max_inflight_reports are in flight; beyond that, changes merge in the buffer until one returns."""

    def __init__(self, app_name: str, replica_id: str, buffer: CacheEventBuffer,
                 load: Callable[[], tuple[int, ...]], config: PrefixRoutingConfig) -> None:
        self.app_name = app_name
        self.replica_id = replica_id
        self.buffer = buffer
        self.config = config
        self._load = load
        self._actor = None
        self._number = 0
        self._last_snapshot = -1
        self._inflight: list[tuple[ray.ObjectRef, int]] = []
        self._last_sent = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-event-publisher", daemon=True)
        self.dropped = False
        self.num_reports = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_error = 0.0
        while not self._stop.wait(self.config.publish_period_s) and not self.dropped:
            try:
                self._tick()
            except Exception as e:  # never let reporting take the replica down; the next tick retries
                self._actor = None
                self.buffer.request_resync()
                if time.monotonic() - last_error > 10:
                    logger.warning("prefix router: report from %s failed: %r", self.replica_id, e)
                    last_error = time.monotonic()

    def _tick(self) -> None:
        if self._actor is None:
            self._actor = get_router_actor(self.app_name, self.config.replica_timeout_s)
        self._collect_answers()
        if len(self._inflight) >= self.config.max_inflight_reports:
            return
        now = time.monotonic()
        report = self.buffer.take()
        if report is None and now - self._last_sent < self.config.heartbeat_period_s:
            return
        snapshot, stored, removed = (report.snapshot, report.stored, report.removed) if report else (None, [], [])
        ref = self._actor.report.remote(self.replica_id, self._number, self._load(), stored, removed, snapshot)
        if snapshot is not None:
            self._last_snapshot = self._number
        self._inflight.append((ref, self._number))
        self._number += 1
        self._last_sent = now
        self.num_reports += 1

    def _collect_answers(self) -> None:
        if not self._inflight:
            return
        refs = [r for r, _ in self._inflight]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            return
        done = set(ready)
        answers = [(ref, n) for ref, n in self._inflight if ref in done]
        self._inflight = [(ref, n) for ref, n in self._inflight if ref not in done]
        for ref, n in answers:
            try:
                answer = ray.get(ref)
            except RayActorError:  # the actor died (it restarts empty) or was killed: find it again, resync
                self._actor = None
                self.buffer.request_resync()
                continue
            if answer == RESYNC and n > self._last_snapshot:
                self.buffer.request_resync()
            elif answer == DROPPED:
                logger.info("prefix router: replica %s was dropped from the index; it stops reporting",
                            self.replica_id)
                self.dropped = True


# ---- the ingress's side ------------------------------------------------------------------------------------


class PrefixAwareRequestRouter(RequestRouter):
    """Routes each LLMServer.generate call by the longest cached prefix of its token ids (the call's first
    argument) against the replicas' loads (nanovllm_ray/router/policy.py). Decisions read only local state:
    the IndexMirror (pulled in the background), Serve's own queue lengths (fresh at each send) and the requests
    this router sent each replica recently."""

    max_sent_hashes = 10_000  # requests routed but not yet confirmed sent; past that the oldest are forgotten

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, block_size: int = 16, **kwargs: Any) -> None:
        self._config = PrefixRoutingConfig.from_kwargs(**kwargs)
        self._block_size = block_size
        self._mirror = IndexMirror(self._config.expect_ttl_s)
        self._actor = None
        self._refresh_task: asyncio.Task | None = None
        self._router_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pending_drops: set[str] = set()
        self._sent_hashes: dict[str, list[int]] = {}
        self._decision_ns: deque[int] = deque(maxlen=50_000)  # wall time of each decision
        self._decision_cpu_ns: deque[int] = deque(maxlen=50_000)  # its thread's CPU time (no preemption)
        self._reasons: Counter[str] = Counter()
        self._rng = random.Random()
        self._recent: dict[str, DecayingCount] = {}  # requests routed to each replica, decaying
        self._undelivered: dict[str, str] = {}  # request -> replica: decided, not yet sent (not in queue lengths)
        self._undelivered_counts: Counter[str] = Counter()
        self._last_pull = 0.0
        self.num_pulls = 0

    # ---- routing -------------------------------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._ensure_refresh()
        start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
        hashes = self._hashes(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        matched = self._mirror.match(hashes) if hashes else {}
        now = time.monotonic()
        loads = {uid: self._load(r) + self._recent_count(uid, now) + self._undelivered_counts[uid]
                 for uid, r in by_id.items()}
        cached = {uid: self._mirror.index.num_blocks(uid) for uid in by_id}
        decision = decide(list(by_id), len(hashes), matched, loads, cached, self._config, self._rng)
        # Counted now, until Serve sends it (then it is in Serve's queue lengths): under a burst many decisions
        # come before the first send, and each must see the ones before it, else all go to one replica.
        if decision.ranking and pending_request is not None:
            self._deciding(pending_request.metadata.internal_request_id, decision.ranking[0])
        self._decision_ns.append(time.perf_counter_ns() - start)
        self._decision_cpu_ns.append(time.thread_time_ns() - cpu_start)
        self._reasons[decision.reason] += 1
        return [[by_id[uid]] for uid in decision.ranking]

    def _hashes(self, pr: PendingRequest | None) -> list[int]:
        """The block hashes of a generate call's prompt that the engine could reuse (all but its last token),
        hashed as the block manager does; [] for other calls."""
        if pr is None or pr.metadata.call_method != "generate" or not pr.args:
            return []
        rid = pr.metadata.internal_request_id
        hashes = self._sent_hashes.get(rid)
        if hashes is not None:  # a retry of the same request
            return hashes
        try:
            ids = np.asarray(pr.args[0], dtype=np.int64)
            if ids.ndim != 1:
                return []
            hashes = prefix_block_hashes(ids, self._block_size, max_blocks=(len(ids) - 1) // self._block_size)
        except (TypeError, ValueError, OverflowError):  # not token ids: route by load alone
            return []
        if len(self._sent_hashes) >= self.max_sent_hashes:
            self._sent_hashes.pop(next(iter(self._sent_hashes)))
        self._sent_hashes[rid] = hashes
        return hashes

    def _recent_count(self, uid: str, now: float) -> float:
        c = self._recent.get(uid)
        return c.get(now) if c is not None else 0.0

    def _load(self, r: RunningReplica) -> float:
        """Ongoing requests at the replica: Serve's queue length (updated at every send and answer), else the
        replica's own report through the router actor, else Serve's routing stats."""
        if self._use_replica_queue_len_cache:
            q = self._replica_queue_len_cache.get(r.replica_id)
            if q is not None:
                return q
        load = self._mirror.loads.get(r.replica_id.unique_id)
        if load is not None:
            return load.num_requests
        stats = r.routing_stats or {}
        return stats.get("num_running", 0) + stats.get("num_waiting", 0)

    def _deciding(self, request_id: str, uid: str) -> None:
        old = self._undelivered.get(request_id)
        if old is not None:  # decided again (its first choice was full): count it once
            self._undelivered_counts[old] -= 1
        self._undelivered[request_id] = uid
        self._undelivered_counts[uid] += 1
        if len(self._undelivered) > self.max_sent_hashes:  # never sent nor completed (should not happen): forget
            self._undelivered_counts[self._undelivered.pop(next(iter(self._undelivered)))] -= 1

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        uid = replica_id.unique_id
        old = self._undelivered.pop(pending_request.metadata.internal_request_id, None)
        if old is not None:
            self._undelivered_counts[old] -= 1
        if uid not in self._recent:
            self._recent[uid] = DecayingCount(self._config.balance_window_s)
        self._recent[uid].add(time.monotonic())
        hashes = self._sent_hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self._mirror.expect(uid, hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._sent_hashes.pop(internal_request_id, None)
        old = self._undelivered.pop(internal_request_id, None)  # never sent (failed or cancelled)
        if old is not None:
            self._undelivered_counts[old] -= 1

    # ---- replicas that die or leave ------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        self._forget(before - {r.unique_id for r in self._replica_id_set})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id.unique_id})

    def _forget(self, replicas: set[str]) -> None:
        """Out of this router's copy now; out of the router actor's index at the next refresh."""
        for r in replicas:
            self._mirror.drop_replica(r)
            self._recent.pop(r, None)
        self._pending_drops |= replicas

    # ---- the index copy ------------------------------------------------------------------------------------

    def _ensure_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_stats = last_error = 0.0
        while True:
            try:
                if self._actor is None:
                    self._actor = await loop.run_in_executor(
                        None, get_router_actor, self.app_name, self._config.replica_timeout_s)
                if self._pending_drops:
                    drops, self._pending_drops = sorted(self._pending_drops), set()
                    self._actor.drop_replicas.remote(drops)
                stats = None
                if time.monotonic() - last_stats >= 1.0:
                    stats, last_stats = self.decision_stats(), time.monotonic()
                pulled = await asyncio.wait_for(
                    self._actor.pull.remote(self._mirror.epoch, self._mirror.seq, self._router_id, stats), 10)
                self._mirror.apply(pulled)
                self._last_pull = time.monotonic()
                self.num_pulls += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the actor died or is slow: decisions go on with the copy we have
                if isinstance(e, RayActorError):
                    self._actor = None
                if time.monotonic() - last_error > 10:
                    logger.warning("prefix router: index refresh failed: %r", e)
                    last_error = time.monotonic()
            await asyncio.sleep(self._config.refresh_period_s)

    def decision_stats(self) -> dict[str, Any]:
        """Decision time (us; wall and the thread's CPU) over the last decisions, how many of each kind, how
        old the index copy is."""
        out: dict[str, Any] = {"num_decisions": sum(self._reasons.values()), "reasons": dict(self._reasons),
                               "num_pulls": self.num_pulls, "num_expected_blocks": self._mirror.num_expected,
                               "index_age_s": time.monotonic() - self._last_pull if self._last_pull else None}
        for name, samples in (("decision_us", self._decision_ns), ("decision_cpu_us", self._decision_cpu_ns)):
            ns = sorted(samples)
            if ns:
                out[f"{name}_p50"] = ns[len(ns) // 2] / 1e3
                out[f"{name}_p99"] = ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1e3
                out[f"{name}_mean"] = statistics.fmean(ns) / 1e3
        return out
