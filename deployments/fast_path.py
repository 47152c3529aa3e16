"""The ingress's fast path, the part shared with the request routers (deployments/request_router.py).

A request's add goes from the ingress straight to the engine core of the replica its request router picks, and the
LLMServer call follows with `pin=` that replica, routed there and nowhere else: the first token does not wait for
the Serve call (about 2 ms on the 2-core machine). The registry lives here, not in request_router.py: Serve pickles a
request router's module by value, so a dict there would be a copy in the ingress, not the one the router fills.
"""

from __future__ import annotations

import asyncio
import weakref

PIN = "pin"  # LLMServer.generate's keyword: the replica whose engine core the ingress already sent the add to
PICK_TTL_S = 1.0  # a pick counts toward its replica's load until its call is routed, or this long at most

_routers: dict[tuple[str, str], weakref.ref] = {}  # (app, deployment) -> this process's router for its handle


def register(router, app: str, deployment: str) -> None:
    _routers[(app, deployment)] = weakref.ref(router)


def avoid_replica(app: str, deployment: str, replica: str) -> None:
    """For the ingress: this replica's engine core went away (its channel closed); route around it for a while.
    A dict write on the router (safe from the ingress's thread, whichever loop the router runs on)."""
    ref = _routers.get((app, deployment))
    router = ref() if ref is not None else None
    if router is not None:
        router.avoid(replica)


async def pick_replica(app: str, deployment: str, request_id: str, token_ids: list[int], known: set[str]
                       ) -> str | None:
    """For the ingress: the replica (of those in `known`) to add this request on itself now, or None for the
    ordinary path (no router yet: Serve makes it at the handle's first call; the replica full or not known). Runs
    on the router's event loop, which may be another thread's."""
    ref = _routers.get((app, deployment))
    router = ref() if ref is not None else None
    if router is None:
        return None
    loop = router._event_loop
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        return router.pick(request_id, token_ids, known)
    future = asyncio.run_coroutine_threadsafe(router.pick_async(request_id, token_ids, known), loop)
    return await asyncio.wrap_future(future)
