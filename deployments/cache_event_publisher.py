"""The LLMServer replica's side of prefix-aware routing: a thread that sends the engine's KV-cache events (buffered
net of each other in a CacheEventBuffer) and the replica's load to the application's router actor."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError

from deployments.router_actor import get_router_actor
from nanovllm_ray.router.events import CacheEventBuffer
from nanovllm_ray.router.policy import PrefixRoutingConfig
from nanovllm_ray.router.state import DROPPED, RESYNC

logger = logging.getLogger("ray.serve")


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
