"""The engine behind asyncio code, and the one engine loop.

EngineLoop: one thread owns an LLMEngine and steps it whenever it has work. Commands (add, abort) come in through
a thread-safe queue and are applied between steps. After each step it hands one StepReport to its sink: every
request's new tokens (packed), the engine's stats and the KV-cache events of that step. A request the engine
refuses, or one whose step fails, gets an error output; the loop goes on. An error outside any one request
stops the loop and is reported once (the engine's state is unknown).

AsyncEngine: the asyncio side. `generate()` streams one request's outputs; each item merges every output that
arrived since the reader last took one (the first goes out at once: no timer), so a slow reader gets fewer, larger
items and never slows the engine. The loop runs in an engine core, a Ray actor of its own (engine/core.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nanovllm_ray import stages
from nanovllm_ray.engine.llm_engine import EngineStats, LLMEngine, RequestError
from nanovllm_ray.engine.output import RequestOutput
from nanovllm_ray.kv_events import KVCacheEvent
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A GPU engine that has gone idle polls for new commands this long before it sleeps (see EngineLoop._next).
IDLE_SPIN_S = 0.05

REFUSED = "refused"  # finish reason of a request the engine did not take (the error is a RequestError's message)
ERROR = "error"  # finish reason of a request the engine took but could not run


class EngineDeadError(RuntimeError):
    """The engine stopped on an error that was not one request's: every request on it fails; the replica must be
    replaced."""


class RequestFailedError(RuntimeError):
    """The engine could not run this one request (the others go on)."""


@dataclass(slots=True)
class StepReport:
    """What the engine loop hands its sink after each step (or after commands that changed its state)."""

    outputs: list[tuple]  # RequestOutput.pack() of each request with news (a subscribed one: first and last only)
    stats: EngineStats
    kv_events: list[KVCacheEvent] = field(default_factory=list)
    num_steps: int = 0
    # subscriber -> every output of its requests: an HTTP front end reads these straight from the engine core
    by_subscriber: dict[str, list[tuple]] = field(default_factory=dict)


class EngineLoop:
    """Steps `engine` on a thread of its own; `on_report(StepReport)` and `on_dead(error)` are called on it."""

    max_remembered_aborts = 10_000

    def __init__(self, engine: LLMEngine, on_report: Callable[[StepReport], None],
                 on_dead: Callable[[BaseException], None]) -> None:
        self.engine = engine
        self._on_report = on_report
        self._on_dead = on_dead
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._early_aborts: OrderedDict[str, None] = OrderedDict()  # aborts that came before their add
        self._subscribers: dict[str, str] = {}  # request -> the subscriber that reads its tokens
        self._reported: set[str] = set()  # subscribed requests whose first output went out
        self._events = engine.config.enable_kv_cache_events
        self.error: BaseException | None = None
        self.num_steps = 0
        # (start, end, sequences, tokens) of each step: where the loop's time goes, for benchmarks
        self.trace: deque[tuple[float, float, int, int]] = deque(maxlen=200_000)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._spin_s = IDLE_SPIN_S if str(getattr(engine.executor, "device", "")).startswith("cuda") else 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(self, commands: list[tuple]) -> None:
        """("add", request_id, prompt token ids or text, SamplingParams[, subscriber]) and ("abort", request_id)
        tuples. A request with a subscriber has all its outputs in the reports' by_subscriber, and only its first
        and last in their outputs."""
        for c in commands:
            self._commands.put(c)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def timeline(self, since: float = 0.0) -> list[tuple[float, float, int, int]]:
        """The steps that started after `since` (time.monotonic)."""
        return [t for t in list(self.trace) if t[0] >= since]

    def _apply(self, cmd: tuple) -> RequestOutput | None:
        engine = self.engine
        if cmd[0] == "abort":
            rid = cmd[1]
            self._subscribers.pop(rid, None)
            self._reported.discard(rid)
            if not engine.abort_request(rid) and engine.get_sequence(rid) is None:
                self._early_aborts[rid] = None  # its add may still be on its way
                while len(self._early_aborts) > self.max_remembered_aborts:
                    self._early_aborts.popitem(last=False)
            return None
        _, rid, prompt, params, *sub = cmd
        if stages.ENABLED:
            stages.stamp("core_add", rid)
        if rid in self._early_aborts:  # aborted before it arrived
            del self._early_aborts[rid]
            return None
        if sub and sub[0] is not None:  # its outputs, a refusal too, go to the subscriber
            self._subscribers[rid] = sub[0]
        try:
            engine.add_request(rid, prompt, params)
        except RequestError as e:
            return RequestOutput(rid, [], REFUSED, error=str(e))
        except Exception as e:  # anything else a request brings (a bad type, a tokenizer error): that request only
            logger.exception("request %s could not be added", rid)
            return RequestOutput(rid, [], ERROR, error=f"the engine could not take this request: "
                                                       f"{type(e).__name__}: {e}")
        return None

    def _next(self) -> tuple:
        """The next command, waiting for it. On a GPU, poll (yielding the GIL) for IDLE_SPIN_S before sleeping: a
        request that comes soon after the engine went idle then finds this thread's core awake. Served at
        concurrency 1 on an H200, a prefill step after such a sleep took 2.7 ms against 1.5 ms offline."""
        deadline = time.monotonic() + self._spin_s
        while time.monotonic() < deadline:
            try:
                return self._commands.get_nowait()
            except queue.Empty:
                time.sleep(0)
        return self._commands.get()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # Block only when there is nothing to step; otherwise take whatever commands are queued.
                cmds = [] if engine.has_unfinished_requests() else [self._next()]
                while True:
                    try:
                        cmds.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if any(c[0] == "stop" for c in cmds):
                    return
                outputs = [o for o in map(self._apply, cmds) if o is not None]
                if engine.has_unfinished_requests():
                    t = time.monotonic()
                    outputs += engine.step()
                    self.trace.append((t, time.monotonic(), *engine.last_batch))
                    self.num_steps += 1
                events = engine.take_kv_events() if self._events else []
                if outputs or events or cmds:
                    control, subs = self._route(outputs)
                    self._on_report(StepReport(control, engine.stats(), events, self.num_steps, subs))
        except BaseException as e:  # the engine's state is unknown: stop stepping, fail everything once
            logger.exception("engine loop died")
            self.error = e
            self._on_dead(e)

    def _route(self, outputs: list[RequestOutput]) -> tuple[list[tuple], dict[str, list[tuple]]]:
        """Outputs for the sink's own stream, and for each subscriber."""
        control: list[tuple] = []
        subs: dict[str, list[tuple]] = {}
        for o in outputs:
            packed = o.pack()
            sub = self._subscribers.get(o.request_id)
            if sub is None:
                control.append(packed)
                continue
            subs.setdefault(sub, []).append(packed)
            if o.finished:
                del self._subscribers[o.request_id]
                self._reported.discard(o.request_id)
                control.append(packed)
            elif o.request_id not in self._reported:
                self._reported.add(o.request_id)
                control.append(packed)
                if stages.ENABLED:
                    stages.stamp("core_first", o.request_id)
        return control, subs


class _Stream:
    """One request's outputs not yet read, and the reader waiting for them."""

    __slots__ = ("items", "waiter", "error")

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class AsyncEngine:
    """Requests in, streams of RequestOutput out, on one asyncio loop. `core` (engine.core.RemoteCore) carries
    commands to the engine loop and its StepReports back; `on_report` sees every report (metrics, cache events),
    `on_dead` the error that stopped the engine.

    A request another client added (`generate(..., adopt=True)`: an ingress that sent the add to the core itself)
    may have outputs here before its stream exists: they wait, for ORPHAN_TTL_S at most."""

    ORPHAN_TTL_S = 60.0
    MAX_ORPHANS = 10_000

    def __init__(self, core, on_report: Callable[[StepReport], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.core = core
        self._on_report_hook = on_report
        self._on_dead_hook = on_dead
        self._streams: dict[str, _Stream] = {}
        self._orphans: OrderedDict[str, tuple[float, list[tuple]]] = OrderedDict()  # request -> (first seen, outputs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple] = []
        self.error: BaseException | None = None
        self.stats: EngineStats = core.initial_stats
        self.num_steps = 0

    # ---- requests ------------------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.core.start(self)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       subscriber: str | None = None, adopt: bool = False) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as they come. Raises RequestError if the engine refuses it (before any
        output), RequestFailedError if it fails on the engine, EngineDeadError if the engine dies. Leaving the
        loop early aborts the request and frees its blocks. With a subscriber, every output goes to that
        subscriber (its channel at the engine core) and this stream has only the first and the last. adopt: the
        subscriber has sent the add to the core itself; this stream follows the request without sending it."""
        self._ensure_started()
        self.check_health()
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = _Stream()
        if adopt:
            stream.items = self._orphans.pop(request_id, (0.0, []))[1]
        else:
            self._send(("add", request_id, prompt_token_ids, params, subscriber))
        finished = False
        try:
            while True:
                while not stream.items and stream.error is None:
                    stream.waiter = self._loop.create_future()
                    await stream.waiter
                if stream.error is not None:
                    finished = True
                    raise stream.error
                items, stream.items = stream.items, []
                out = RequestOutput.merge([RequestOutput.unpack(t) for t in items])
                if out.finish_reason == REFUSED:
                    finished = True
                    raise RequestError(out.error)
                if out.finish_reason == ERROR:
                    finished = True
                    raise RequestFailedError(out.error)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    def _send(self, cmd: tuple) -> None:
        """Commands of one loop iteration go to the core together."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(cmd)

    def _flush(self) -> None:
        cmds, self._outbox = self._outbox, []
        if cmds and self.error is None:
            self.core.submit(cmds)

    # ---- reports (on the asyncio loop) ---------------------------------------------------------------------

    def on_report(self, report: StepReport) -> None:
        """Fan one step's outputs out to the request streams."""
        streams = self._streams
        for packed in report.outputs:
            s = streams.get(packed[0])
            if s is not None:
                s.items.append(packed)
                s.wake()
            else:
                self._orphan(packed)
        self.stats = report.stats
        self.num_steps = report.num_steps
        if self._on_report_hook is not None:
            self._on_report_hook(report)

    def _orphan(self, packed: tuple) -> None:
        """An output of a request without a stream here: one being adopted whose call has not come yet (or one
        this client has left: it expires)."""
        now = time.monotonic()
        entry = self._orphans.get(packed[0])
        if entry is None:
            entry = self._orphans[packed[0]] = (now, [])
        entry[1].append(packed)
        while self._orphans:
            first, (t, _) = next(iter(self._orphans.items()))
            if now - t < self.ORPHAN_TTL_S and len(self._orphans) <= self.MAX_ORPHANS:
                break
            del self._orphans[first]

    def on_dead(self, error: BaseException) -> None:
        if self.error is not None:
            return
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(
            f"the engine died: {type(error).__name__}: {error}")
        if dead is not error:
            dead.__cause__ = error
        self.error = dead
        logger.error("%s; failing %d requests", self.error, len(self._streams))
        for s in self._streams.values():
            s.error = self.error
            s.wake()
        if self._on_dead_hook is not None:
            self._on_dead_hook(self.error)

    # ---- health --------------------------------------------------------------------------------------------

    def check_health(self) -> None:
        if self.error is not None:
            raise self.error

    def shutdown(self) -> None:
        self.core.shutdown()
