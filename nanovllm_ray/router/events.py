"""The replica's side of cache reporting: KV cache events from the engine thread, held until the publisher sends
them to the router actor.

Events are kept net of each other (a block stored then evicted before the next report is never sent), so a
slow router actor costs memory bounded by the blocks that changed, and past `max_pending` changes the buffer
gives up the delta and sends a snapshot instead. It also keeps the set of blocks the replica holds, which is
that snapshot: sent first (a replica that starts, or restarts, replaces whatever the index had for it) and again
whenever the router actor asks for one (a report it did not get, a restarted actor).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from nanovllm_ray.kv_events import BlockRemoved, BlockStored, KVCacheEvent


@dataclass(slots=True)
class CacheReport:
    """What the publisher sends: a snapshot of every block held, or the blocks stored and removed since the
    last report (net: a hash is in at most one of the two lists)."""

    snapshot: list[int] | None
    stored: list[int]
    removed: list[int]


class CacheEventBuffer:
    def __init__(self, max_pending: int = 1 << 16) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._held: set[int] = set()
        # hash -> True (stored) / False (removed), relative to what the last report told the router
        self._pending: dict[int, bool] = {}
        self._resync = True  # the first report is a snapshot
        self.num_events = 0
        self.num_snapshots = 0

    @property
    def num_held(self) -> int:
        return len(self._held)

    def add(self, events: Iterable[KVCacheEvent]) -> None:
        """Called by the engine thread with the block manager's events, in order."""
        with self._lock:
            pending, held = self._pending, self._held
            for e in events:
                self.num_events += 1
                h = e.block_hash
                if isinstance(e, BlockStored):
                    held.add(h)
                    # removed and stored again since the last report: the router's view is already right
                    if pending.get(h) is False:
                        del pending[h]
                    else:
                        pending[h] = True
                elif isinstance(e, BlockRemoved):
                    held.discard(h)
                    if pending.get(h) is True:  # stored and removed since the last report: never sent
                        del pending[h]
                    else:
                        pending[h] = False
            if len(pending) > self.max_pending:
                pending.clear()
                self._resync = True

    def request_resync(self) -> None:
        """The next report is a snapshot (the router actor lost track of this replica)."""
        with self._lock:
            self._pending.clear()
            self._resync = True

    def take(self) -> CacheReport | None:
        """The report to send now, or None when nothing changed since the last one."""
        with self._lock:
            if self._resync:
                self._resync = False
                self._pending.clear()
                self.num_snapshots += 1
                return CacheReport(list(self._held), [], [])
            if not self._pending:
                return None
            stored = [h for h, s in self._pending.items() if s]
            removed = [h for h, s in self._pending.items() if not s]
            self._pending.clear()
            return CacheReport(None, stored, removed)
