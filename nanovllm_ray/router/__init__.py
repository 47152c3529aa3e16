"""Prefix-aware routing, pure Python: the global index of cached prefix blocks (prefix_index), the router actor's
state and the request routers' copies of it (state), the replica's event buffer (events) and the routing policy
(policy). The Ray pieces that carry them are in deployments/: router_actor.py, cache_event_publisher.py and
request_router.py, one per process."""

from nanovllm_ray.router.events import CacheEventBuffer, CacheReport
from nanovllm_ray.router.policy import Decision, PrefixRoutingConfig, decide, is_imbalanced
from nanovllm_ray.router.prefix_index import PrefixIndex, ReplicaLoad, longest_prefix
from nanovllm_ray.router.state import IndexMirror, RouterState

__all__ = ["CacheEventBuffer", "CacheReport", "Decision", "IndexMirror", "PrefixIndex", "PrefixRoutingConfig",
           "ReplicaLoad", "RouterState", "decide", "is_imbalanced", "longest_prefix"]
