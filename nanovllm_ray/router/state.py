"""The router actor's state and the request routers' local copies of it, without Ray (tested on their own).

RouterState (in the router actor, one per application) takes the replicas' numbered reports into a PrefixIndex
and keeps a journal of the changes, numbered by one sequence. IndexMirror (in each request router) pulls what
changed since the sequence number it has; one that fell behind the journal, or that sees another epoch (the
actor restarted), gets a snapshot instead. The index a request router routes by is therefore at most one pull
period plus one report period old.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nanovllm_ray.router.prefix_index import PrefixIndex, ReplicaLoad, load_to_wire, loads_from_wire, longest_prefix

OK, RESYNC, DROPPED = "ok", "resync", "dropped"  # answers to a report
RESET, DELTA, DROP = "reset", "delta", "drop"  # journal entries


@dataclass(slots=True)
class _Entry:
    seq: int
    op: str
    replica: str
    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()

    def wire(self) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
        return (self.op, self.replica, self.stored, self.removed)


class RouterState:
    """The global index of one application, fed by its replicas' reports.

    A replica numbers its reports 0, 1, 2, ...; the first is a snapshot (a replica that starts replaces what
    the index held for it: a restarted replica starts empty). A report whose number does not follow the last
    one is refused with RESYNC, and the replica answers with a snapshot. Replicas that the request routers see
    die are dropped with every entry, and their late reports refused (DROPPED); a replica silent for
    `replica_timeout_s` is dropped too, but may come back with a snapshot.
    """

    def __init__(self, max_journal_items: int = 200_000, replica_timeout_s: float = 30.0,
                 max_tombstones: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.epoch = uuid.uuid4().hex
        self.index = PrefixIndex()
        self.loads: dict[str, ReplicaLoad] = {}
        self.seq = 0
        self.max_journal_items = max_journal_items
        self.replica_timeout_s = replica_timeout_s
        self.max_tombstones = max_tombstones
        self._clock = clock
        self._journal: deque[_Entry] = deque()
        self._journal_items = 0
        self._last_report: dict[str, int] = {}
        self._last_seen: dict[str, float] = {}
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self.router_stats: dict[str, dict[str, Any]] = {}
        self.num_reports = self.num_resyncs = 0
        self.last_call = clock()  # a report or a pull: how long the application has been gone, if it has

    # ---- from the replicas ---------------------------------------------------------------------------------

    def report(self, replica: str, number: int, load: tuple[int, ...], stored: Sequence[int] = (),
               removed: Sequence[int] = (), snapshot: Sequence[int] | None = None) -> str:
        self.last_call = self._clock()
        if replica in self._dropped:
            return DROPPED
        self.num_reports += 1
        if snapshot is not None:
            self.index.reset_replica(replica, snapshot)
            self._log(RESET, replica, tuple(snapshot))
        elif self._last_report.get(replica) != number - 1:
            self.num_resyncs += 1
            return RESYNC
        elif stored or removed:
            self.index.apply(replica, stored, removed)
            self._log(DELTA, replica, tuple(stored), tuple(removed))
        self._last_report[replica] = number
        self._last_seen[replica] = self._clock()
        self.loads[replica] = ReplicaLoad(*load)
        return OK

    # ---- from the request routers --------------------------------------------------------------------------

    def drop_replicas(self, replicas: Iterable[str]) -> list[str]:
        """Replicas that died: forget them and refuse their late reports. Returns those that were known."""
        dropped = []
        for r in replicas:
            self._dropped[r] = None
            if len(self._dropped) > self.max_tombstones:
                self._dropped.popitem(last=False)
            if self._forget(r):
                dropped.append(r)
        return dropped

    def pull(self, epoch: str | None, since: int, router: str | None = None,
             router_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Changes after sequence number `since` of `epoch`, or a snapshot if those are gone or from another
        epoch; the replicas' loads either way."""
        self.last_call = self._clock()
        if router is not None and router_stats is not None:
            self.router_stats[router] = router_stats
        self.expire()
        out: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq,
                               "loads": {r: load_to_wire(v) for r, v in self.loads.items()}}
        first = self._journal[0].seq if self._journal else self.seq + 1
        if epoch == self.epoch and first - 1 <= since <= self.seq:
            out["delta"] = [e.wire() for e in itertools.islice(self._journal, since - first + 1, None)]
        else:
            out["snapshot"] = self.index.snapshot()
        return out

    def expire(self) -> list[str]:
        """Drop replicas silent for longer than replica_timeout_s (no tombstone: they may come back)."""
        now = self._clock()
        gone = [r for r, t in self._last_seen.items() if now - t > self.replica_timeout_s]
        for r in gone:
            self._forget(r)
        return gone

    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, "num_hashes": len(self.index),
                "replicas": {r: {"num_blocks": self.index.num_blocks(r),
                                 "load": asdict(self.loads[r]) if r in self.loads else None}
                             for r in self.index.replicas},
                "dropped": list(self._dropped), "num_reports": self.num_reports, "num_resyncs": self.num_resyncs,
                "journal_items": self._journal_items, "routers": dict(self.router_stats)}

    # ---- internals -----------------------------------------------------------------------------------------

    def _forget(self, replica: str) -> bool:
        self._last_report.pop(replica, None)
        self._last_seen.pop(replica, None)
        self.loads.pop(replica, None)
        if self.index.drop_replica(replica):
            self._log(DROP, replica)
            return True
        return False

    def _log(self, op: str, replica: str, stored: tuple[int, ...] = (), removed: tuple[int, ...] = ()) -> None:
        self.seq += 1
        self._journal.append(_Entry(self.seq, op, replica, stored, removed))
        self._journal_items += 1 + len(stored) + len(removed)
        while self._journal_items > self.max_journal_items and len(self._journal) > 1:
            e = self._journal.popleft()
            self._journal_items -= 1 + len(e.stored) + len(e.removed)


class IndexMirror:
    """A request router's copy of the index, brought up to date by each pull, plus what this router expects:
    the blocks of requests it just sent to a replica, held there for `expect_ttl_s` (until the replica's own
    report has had time to arrive), so that a burst of requests with a new prefix does not scatter before the
    first one's blocks are reported."""

    def __init__(self, expect_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = PrefixIndex()
        self.loads: dict[str, ReplicaLoad] = {}
        self.epoch: str | None = None
        self.seq = 0
        self.expect_ttl_s = expect_ttl_s
        self._clock = clock
        self._expected: dict[int, dict[str, float]] = {}  # hash -> replica -> expiry
        self._expiries: deque[tuple[float, str, Sequence[int]]] = deque()
        self.num_snapshots = 0

    def apply(self, pulled: dict[str, Any]) -> None:
        """Take the result of RouterState.pull."""
        if "snapshot" in pulled:
            self.num_snapshots += 1
            self.index = PrefixIndex()
            for r, hashes in pulled["snapshot"].items():
                self.index.reset_replica(r, hashes)
        else:
            for op, r, stored, removed in pulled["delta"]:
                if op == RESET:
                    self.index.reset_replica(r, stored)
                elif op == DELTA:
                    self.index.apply(r, stored, removed)
                else:
                    self.index.drop_replica(r)
        self.epoch, self.seq = pulled["epoch"], pulled["seq"]
        self.loads = loads_from_wire(pulled["loads"])

    def drop_replica(self, replica: str) -> None:
        self.index.drop_replica(replica)
        self.loads.pop(replica, None)

    def expect(self, replica: str, hashes: Sequence[int]) -> None:
        if not hashes or self.expect_ttl_s <= 0:
            return
        expiry = self._clock() + self.expect_ttl_s
        for h in hashes:
            self._expected.setdefault(h, {})[replica] = expiry
        self._expiries.append((expiry, replica, hashes))

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, the leading blocks of `hashes` it holds (as reported) or is expected to hold."""
        self._sweep()
        if not self._expected:
            return self.index.match(hashes)
        index_holders, expected = self.index.holders, self._expected

        def holders(h: int):
            held, exp = index_holders(h), expected.get(h)
            if not exp:
                return held
            return exp.keys() if not held else held | exp.keys()

        return longest_prefix(hashes, holders)

    @property
    def num_expected(self) -> int:
        return len(self._expected)

    def _sweep(self) -> None:
        now = self._clock()
        q = self._expiries
        while q and q[0][0] <= now:
            _, r, hashes = q.popleft()
            for h in hashes:
                d = self._expected.get(h)
                if d is not None and d.get(r, now + 1) <= now:
                    del d[r]
                    if not d:
                        del self._expected[h]
