"""The global prefix index: which replica holds which KV block, keyed by the chained block hash (kv_events.py).

Replicas report what their block managers store and evict, so the index holds what each replica really caches,
not a guess from past routing. Because a block's hash chains its parent's, the blocks a request can reuse on a
replica are the leading run of its block hashes found there: `match` walks the request's hashes once and counts
that run per replica. Memory follows what the replicas hold: a removed block leaves the index, a dropped replica
takes all its entries with it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass


@dataclass(slots=True)
class ReplicaLoad:
    """A replica's engine as it last reported: requests running and waiting, free and total KV blocks, and its
    totals since it started (requests finished, prompt tokens looked up in its prefix cache and found there)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_finished: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


def longest_prefix(hashes: Sequence[int], holders: Callable[[int], Collection[str] | None]) -> dict[str, int]:
    """Per replica, how many leading blocks of `hashes` it holds (replicas holding none are absent).

    `holders(h)` gives the replicas that hold block h (or None). One pass, stopping when no replica is left.
    """
    matched: dict[str, int] = {}
    alive: set[str] | None = None
    n = 0
    for h in hashes:
        held = holders(h)
        if not held:
            break
        if alive is None:
            alive = set(held)
        elif not alive.issubset(held):
            for r in alive.difference(held):
                matched[r] = n
            alive.intersection_update(held)
            if not alive:
                return matched
        n += 1
    for r in alive or ():
        matched[r] = n
    return matched


class PrefixIndex:
    """block hash -> replicas holding it, and replica -> its block hashes (to drop a replica in one pass)."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._blocks: dict[str, set[int]] = {}

    # ---- queries -------------------------------------------------------------------------------------------

    @property
    def replicas(self) -> list[str]:
        return list(self._blocks)

    def __contains__(self, replica: str) -> bool:
        return replica in self._blocks

    def __len__(self) -> int:
        """Distinct blocks held by any replica."""
        return len(self._holders)

    def num_blocks(self, replica: str) -> int:
        blocks = self._blocks.get(replica)
        return len(blocks) if blocks is not None else 0

    def blocks(self, replica: str) -> set[int]:
        return set(self._blocks.get(replica, ()))

    def holders(self, block_hash: int) -> set[str] | None:
        return self._holders.get(block_hash)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, the number of leading blocks of `hashes` (a request's prefix_block_hashes) it holds."""
        return longest_prefix(hashes, self._holders.get)

    def snapshot(self) -> dict[str, list[int]]:
        return {r: list(b) for r, b in self._blocks.items()}

    # ---- changes -------------------------------------------------------------------------------------------

    def reset_replica(self, replica: str, hashes: Iterable[int] = ()) -> None:
        """Replace what `replica` holds (a snapshot, or empty for a replica that starts)."""
        self.drop_replica(replica)
        self._blocks[replica] = set()
        self.apply(replica, hashes, ())

    def apply(self, replica: str, stored: Iterable[int], removed: Iterable[int]) -> None:
        """A replica's changes, net of each other (a hash is in at most one of the two): removals first."""
        blocks = self._blocks.setdefault(replica, set())
        for h in removed:
            if h in blocks:
                blocks.discard(h)
                held = self._holders[h]
                held.discard(replica)
                if not held:
                    del self._holders[h]
        for h in stored:
            if h not in blocks:
                blocks.add(h)
                self._holders.setdefault(h, set()).add(replica)

    def drop_replica(self, replica: str) -> bool:
        """Forget `replica` and every block it held; False if it was unknown."""
        blocks = self._blocks.pop(replica, None)
        if blocks is None:
            return False
        for h in blocks:
            held = self._holders[h]
            held.discard(replica)
            if not held:
                del self._holders[h]
        return True

    def check(self) -> None:
        """The two maps agree (tests)."""
        pairs = {(h, r) for h, rs in self._holders.items() for r in rs}
        assert all(rs for rs in self._holders.values())
        assert pairs == {(h, r) for r, hs in self._blocks.items() for h in hs}


def loads_from_wire(loads: Mapping[str, tuple[int, ...]]) -> dict[str, ReplicaLoad]:
    return {r: ReplicaLoad(*v) for r, v in loads.items()}


def load_to_wire(load: ReplicaLoad) -> tuple[int, ...]:
    return astuple(load)
