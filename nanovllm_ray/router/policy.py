"""Which replica a request goes to: the longest cached prefix against load, with SGLang's balance guard.

A replica's load is its ongoing requests plus the requests routed to it recently (a count that decays with time
constant balance_window_s), so that a replica holding the popular prefixes is seen as busier than its peers
even when the requests are too short or too spread in time to overlap. If the loads of the candidates are out
of balance (max - min > balance_abs_threshold and max > min *
balance_rel_threshold), cache affinity is ignored and the least loaded replica goes first. Otherwise the replica
with the longest cached prefix goes first (ties: the less loaded), provided that prefix is at least
cache_threshold of the request's blocks; below that, the least loaded replica (ties: the longer prefix, then the
one caching fewer blocks, which has more room). The ranking lists every candidate, best first: Serve falls back
down the list when a replica's queue is full.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

AFFINITY, BALANCE, LEAST_LOADED = "affinity", "balance", "least_loaded"


@dataclass(slots=True)
class PrefixRoutingConfig:
    """Tunables of prefix-aware routing: the policy, and how fresh the index is kept."""

    balance_abs_threshold: float = 8.0  # load (requests): max - min above this ...
    balance_rel_threshold: float = 1.3  # ... and max above min times this: imbalanced, route by load alone
    balance_window_s: float = 10.0  # load counts requests routed in about the last this many seconds (0: none)
    cache_threshold: float = 0.25  # the cached prefix must cover this fraction of the request's full blocks
    refresh_period_s: float = 0.05  # request routers pull the index changes this often
    publish_period_s: float = 0.02  # replicas send their cache events this often (when there are any) ...
    heartbeat_period_s: float = 0.5  # ... and their load at least this often
    expect_ttl_s: float = 2.0  # a request router counts blocks of a request it sent as held for this long
    replica_timeout_s: float = 30.0  # the router actor drops a replica silent for this long
    max_inflight_reports: int = 4  # reports a replica has in flight before it holds the next back (they merge)

    def __post_init__(self) -> None:
        checks = [
            (self.balance_abs_threshold >= 0, "balance_abs_threshold", ">= 0"),
            (self.balance_rel_threshold >= 1, "balance_rel_threshold", ">= 1"),
            (self.balance_window_s >= 0, "balance_window_s", ">= 0"),
            (0 <= self.cache_threshold <= 1, "cache_threshold", "in [0, 1]"),
            (self.refresh_period_s > 0, "refresh_period_s", "> 0"),
            (self.publish_period_s > 0, "publish_period_s", "> 0"),
            (self.heartbeat_period_s >= self.publish_period_s, "heartbeat_period_s", ">= publish_period_s"),
            (self.expect_ttl_s >= 0, "expect_ttl_s", ">= 0"),
            (self.replica_timeout_s > self.heartbeat_period_s, "replica_timeout_s", "> heartbeat_period_s"),
            (self.max_inflight_reports >= 1, "max_inflight_reports", ">= 1"),
        ]
        for ok, name, limit in checks:
            if not ok:
                raise ValueError(f"prefix routing: {name}={getattr(self, name)} must be {limit}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> PrefixRoutingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"prefix routing: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DecayingCount:
    """Requests routed recently: each counts 1 when routed and decays with time constant tau_s."""

    __slots__ = ("tau_s", "value", "t")

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self.value = 0.0
        self.t = 0.0

    def get(self, now: float) -> float:
        if self.tau_s <= 0 or self.value == 0.0:
            return 0.0
        return self.value * math.exp(-(now - self.t) / self.tau_s)

    def add(self, now: float, n: float = 1.0) -> None:
        self.value = self.get(now) + n
        self.t = now


@dataclass(slots=True)
class Decision:
    ranking: list[str]  # every candidate, best first
    reason: str  # affinity | balance | least_loaded
    matched_blocks: int  # cached blocks of the request on the first choice


def is_imbalanced(loads: Sequence[float], config: PrefixRoutingConfig) -> bool:
    if len(loads) < 2:
        return False
    lo, hi = min(loads), max(loads)
    return hi - lo > config.balance_abs_threshold and hi > lo * config.balance_rel_threshold


def decide(candidates: Sequence[str], num_blocks: int, matched: Mapping[str, int], loads: Mapping[str, float],
           cached_blocks: Mapping[str, int], config: PrefixRoutingConfig,
           rng: random.Random | None = None) -> Decision:
    """Rank `candidates` for a request of `num_blocks` full blocks; `matched` is each replica's cached prefix
    in blocks (absent: none), `loads` its load (ongoing plus recent requests), `cached_blocks` how many blocks
    it caches."""
    rand = (rng or random).random
    if not candidates:
        return Decision([], LEAST_LOADED, 0)
    if is_imbalanced([loads.get(r, 0) for r in candidates], config):
        reason = BALANCE
        keys = {r: (loads.get(r, 0), -matched.get(r, 0), rand()) for r in candidates}
    else:
        best = max(matched.get(r, 0) for r in candidates)
        if best > 0 and best >= config.cache_threshold * num_blocks:
            reason = AFFINITY
            keys = {r: (-matched.get(r, 0), loads.get(r, 0), rand()) for r in candidates}
        else:
            reason = LEAST_LOADED
            keys = {r: (loads.get(r, 0), -matched.get(r, 0), cached_blocks.get(r, 0), rand()) for r in candidates}
    ranking = sorted(candidates, key=keys.__getitem__)
    return Decision(ranking, reason, matched.get(ranking[0], 0))
