"""The request routers of the ingress -> LLMServer handle (in the ingress's process).

PrefixAwareRequestRouter ranks the replicas by the cached prefix of each call's token ids against their loads, from
a local copy of the router actor's index (pulled in the background: a decision is local Python, no remote call).
LeastLoadedRequestRouter is Serve's power of two choices, for `routing: ray`.

Both give the ingress its fast path (deployments/fast_path.py): `pick()` names the replica a request would be routed
to now, where its queue has room and the ingress holds a channel to its engine core; the ingress sends the add to
that core itself and then calls the LLMServer with `pin=` that replica, and the router routes the call there and
nowhere else (Serve still queues, counts and cancels it). Serve's FIFO assignment (a
replica chosen for one request handed to the oldest waiting one) would break pins, so neither router uses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import time
import uuid
from collections import Counter, deque
from typing import Any

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from deployments import fast_path
from deployments.router_actor import get_router_actor
from nanovllm_ray.kv_events import prefix_block_hashes
from nanovllm_ray.router.policy import DecayingCount, PrefixRoutingConfig, decide
from nanovllm_ray.router.state import IndexMirror

logger = logging.getLogger("ray.serve")

REQUEST_ROUTER_CLASS = "deployments.request_router:PrefixAwareRequestRouter"
LEAST_LOADED_ROUTER_CLASS = "deployments.request_router:LeastLoadedRequestRouter"

def prefix_request_router_config(block_size: int, routing_kwargs: dict[str, Any]) -> RequestRouterConfig:
    """The LLMServer deployment's request_router_config for prefix-aware routing."""
    config = PrefixRoutingConfig.from_kwargs(**routing_kwargs)
    return RequestRouterConfig(request_router_class=REQUEST_ROUTER_CLASS,
                               request_router_kwargs={"block_size": block_size, **config.to_dict()},
                               request_routing_stats_period_s=2.0)


def least_loaded_request_router_config() -> RequestRouterConfig:
    """The LLMServer deployment's request_router_config for Serve's own routing (power of two choices)."""
    return RequestRouterConfig(request_router_class=LEAST_LOADED_ROUTER_CLASS, request_routing_stats_period_s=2.0)


# A replica whose call failed as unavailable, or whose engine core's channel closed on the ingress, is left out of
# routing this long (unless no other is left): a replica killed a moment ago answers ActorUnavailableError, not
# ActorDiedError, until Ray learns that it died, and Serve then only drops its cached queue length, so a retry would
# be routed straight back to it (to the prefix it holds).
UNAVAILABLE_AVOID_S = 5.0


class _FastPath:
    """What both routers share: pins, picks, a replica's load, and the replicas to avoid for a while."""

    def _init_fast_path(self) -> None:
        self._picks: dict[str, tuple[str, float]] = {}  # engine request id -> (replica, when picked), oldest first
        self._pick_counts: Counter[str] = Counter()  # replica -> its picks not yet routed
        self._unavailable: dict[str, float] = {}  # replica -> when a call to it failed as unavailable
        fast_path.register(self, self._deployment_id.app_name, self._deployment_id.name)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_unavailable(replica_id)
        self.avoid(replica_id.unique_id)

    def avoid(self, uid: str) -> None:
        self._unavailable[uid] = time.monotonic()

    def _available(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """replicas without those unavailable in the last UNAVAILABLE_AVOID_S; all of them if none would be left."""
        now = time.monotonic()
        for uid in [u for u, t in self._unavailable.items() if now - t > UNAVAILABLE_AVOID_S]:
            del self._unavailable[uid]
        if not self._unavailable:
            return replicas
        return [r for r in replicas if r.replica_id.unique_id not in self._unavailable] or replicas

    def _pinned(self, candidates: list[RunningReplica], pr: PendingRequest | None) -> list[list[RunningReplica]] | None:
        """A pinned call's only replica; [] while it is not among the candidates (it is waited for: if it died,
        its engine core's channel tells the ingress, which cancels this call); None for an unpinned call."""
        pin = pr.kwargs.get(fast_path.PIN) if pr is not None and pr.kwargs else None
        if pin is None:
            return None
        # Serve tries again at once, without yielding its loop, unless a router asks for its backoff: a pinned call
        # whose replica has left would spin the ingress's event loop.
        pr.routing_context.should_backoff = True
        return [[r] for r in candidates if r.replica_id.unique_id == pin]

    def _queue_len(self, r: RunningReplica, reported: float | None = None) -> float:
        """Ongoing requests at the replica: Serve's queue length (updated at every send and answer), else what the
        replica `reported` (if given), else Serve's routing stats of the replica."""
        q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
        if q is not None:
            return q
        if reported is not None:
            return reported
        stats = r.routing_stats or {}
        return stats.get("num_running", 0) + stats.get("num_waiting", 0)

    def _picked(self, uid: str, now: float) -> int:
        """Picks for the replica not yet routed (those older than fast_path.PICK_TTL_S are forgotten)."""
        while self._picks:
            rid, (_, t) = next(iter(self._picks.items()))
            if now - t <= fast_path.PICK_TTL_S:
                break
            self._drop_pick(rid)
        return self._pick_counts[uid]

    def _drop_pick(self, request_id: str) -> None:
        pick = self._picks.pop(request_id, None)
        if pick is not None:
            self._pick_counts[pick[0]] -= 1

    def pick(self, request_id: str, token_ids: list[int], known: set[str]) -> str | None:
        """On the router's loop: the replica this request goes to now if it has room, among `known`."""
        by_id = {r.replica_id.unique_id: r for r in self._available(list(self._replicas.values()))}
        if not by_id:
            return None
        uid = self._best(token_ids, by_id)
        r = by_id.get(uid)
        now = time.monotonic()
        if r is None or uid not in known or self._queue_len(r) + self._picked(uid, now) >= r.max_ongoing_requests:
            return None
        self._drop_pick(request_id)
        self._picks[request_id] = (uid, now)
        self._pick_counts[uid] += 1
        return uid

    async def pick_async(self, request_id: str, token_ids: list[int], known: set[str]) -> str | None:
        return self.pick(request_id, token_ids, known)

    def _may_go(self, pr: PendingRequest, uid: str) -> bool:
        pin = pr.kwargs.get(fast_path.PIN) if pr.kwargs else None
        return pin is None or pin == uid

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Hand a chosen replica to the request it was chosen for if that one still waits, else to the oldest
        waiting request that may go there (not pinned elsewhere). Serve finds "the request it was chosen for" by
        internal request id, which all calls made while serving one HTTP request share (its choices: n, a batch
        of prompts); by that alone all but the first would wait forever."""
        uid = replica.replica_id.unique_id
        pr = self._get_pending_request_matching_internal_request_id(request_metadata)
        if pr is None or not self._may_go(pr, uid):
            pr = next((p for p in self._pending_requests_to_fulfill if not p.future.done() and self._may_go(p, uid)),
                      None)
        if pr is None:
            return
        self._cancel_routing_task_for_pending_request(pr)
        self._record_queue_wait_time(pr)
        pr.future.set_result(replica)
        self._remove_pending_request_from_indices(pr)

    def _routed_pick(self, pr: PendingRequest) -> None:
        if pr.kwargs and pr.kwargs.get(fast_path.PIN) is not None and len(pr.args) > 2:
            self._drop_pick(pr.args[2])

    def _best(self, token_ids: list[int], by_id: dict[str, RunningReplica]) -> str | None:
        raise NotImplementedError


class LeastLoadedRequestRouter(_FastPath, LocalityMixin, RequestRouter):
    """Serve's power of two choices (two random replicas, those on this node first; Serve takes the shorter queue
    of the two), with pins and without FIFO assignment. A pick is the least loaded replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_fast_path()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        pinned = self._pinned(candidate_replicas, pending_request)
        if pinned is not None:
            return pinned
        candidates = {r.replica_id for r in self._available(candidate_replicas)}
        ids = [i for i in self.apply_locality_routing(pending_request) or () if i in candidates] or list(candidates)
        return [[self._replicas[i] for i in random.sample(ids, min(2, len(ids))) if i in self._replicas]]

    def _best(self, token_ids: list[int], by_id: dict[str, RunningReplica]) -> str | None:
        now = time.monotonic()
        return min(by_id, key=lambda uid: (self._queue_len(by_id[uid]) + self._picked(uid, now), random.random()))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        self._routed_pick(pending_request)


class PrefixAwareRequestRouter(_FastPath, RequestRouter):
    """Routes each LLMServer.generate call by the longest cached prefix of its token ids (the call's first
    argument) against the replicas' loads (nanovllm_ray/router/policy.py). Decisions read only local state:
    the IndexMirror (pulled in the background), Serve's own queue lengths (fresh at each send) and the requests
    this router sent each replica recently."""

    max_sent_hashes = 10_000  # requests routed but not yet confirmed sent; past that the oldest are forgotten

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()
        self._init_fast_path()

    def initialize_state(self, block_size: int | None = None, **kwargs: Any) -> None:
        """Serve passes the request_router_kwargs of prefix_request_router_config(): block_size is the engine's
        (the app's Config), so prompts hash as the block manager hashes them. Until then: load alone."""
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
        if pending_request is not None:  # a second try backs off (Serve's default: again at once, a busy loop)
            pending_request.routing_context.should_backoff = True
        start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
        hashes = self._hashes(pending_request)
        pinned = self._pinned(candidate_replicas, pending_request)
        if pinned is not None:  # decided by pick() (on_request_routed still expects its blocks there)
            return pinned
        by_id = {r.replica_id.unique_id: r for r in self._available(candidate_replicas)}
        decision = self._decide(hashes, by_id)
        # Counted now, until Serve sends it (then it is in Serve's queue lengths): under a burst many decisions
        # come before the first send, and each must see the ones before it, else all go to one replica.
        if decision.ranking and pending_request is not None:
            self._deciding(pending_request.metadata.internal_request_id, decision.ranking[0])
        self._decision_ns.append(time.perf_counter_ns() - start)
        self._decision_cpu_ns.append(time.thread_time_ns() - cpu_start)
        self._reasons[decision.reason] += 1
        return [[by_id[uid]] for uid in decision.ranking]

    def _decide(self, hashes: list[int], by_id: dict[str, RunningReplica]):
        matched = self._mirror.match(hashes) if hashes else {}
        now = time.monotonic()
        loads = {uid: self._load(r) + self._recent_count(uid, now) + self._undelivered_counts[uid]
                 + self._picked(uid, now) for uid, r in by_id.items()}
        cached = {uid: self._mirror.index.num_blocks(uid) for uid in by_id}
        return decide(list(by_id), len(hashes), matched, loads, cached, self._config, self._rng)

    def _best(self, token_ids: list[int], by_id: dict[str, RunningReplica]) -> str | None:
        self._ensure_refresh()
        decision = self._decide(self._hash_ids(token_ids), by_id)
        self._reasons[decision.reason] += 1
        return decision.ranking[0] if decision.ranking else None

    def _hashes(self, pr: PendingRequest | None) -> list[int]:
        """The block hashes of a generate call's prompt that the engine could reuse (all but its last token),
        hashed as the block manager does; [] for other calls."""
        if pr is None or pr.metadata.call_method != "generate" or not pr.args:
            return []
        if self._block_size is None:
            return []
        rid = pr.metadata.internal_request_id
        hashes = self._sent_hashes.get(rid)
        if hashes is not None:  # a retry of the same request
            return hashes
        hashes = self._hash_ids(pr.args[0])
        if not hashes:
            return hashes
        if len(self._sent_hashes) >= self.max_sent_hashes:
            self._sent_hashes.pop(next(iter(self._sent_hashes)))
        self._sent_hashes[rid] = hashes
        return hashes

    def _hash_ids(self, token_ids) -> list[int]:
        if self._block_size is None:
            return []
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
            if ids.ndim != 1:
                return []
            return prefix_block_hashes(ids, self._block_size, max_blocks=(len(ids) - 1) // self._block_size)
        except (TypeError, ValueError, OverflowError):  # not token ids: route by load alone
            return []

    def _recent_count(self, uid: str, now: float) -> float:
        c = self._recent.get(uid)
        return c.get(now) if c is not None else 0.0

    def _load(self, r: RunningReplica) -> float:
        """Ongoing requests at the replica: Serve's queue length (updated at every send and answer), else the
        replica's own report through the router actor, else Serve's routing stats."""
        load = self._mirror.loads.get(r.replica_id.unique_id)
        return self._queue_len(r, load.num_requests if load is not None else None)

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
        self._routed_pick(pending_request)
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
