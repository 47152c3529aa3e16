"""The engine behind an asyncio server: one thread owns the LLMEngine and runs its step loop; coroutines add and
abort requests through a thread-safe queue (applied between steps) and read each request's outputs from an
asyncio queue. No Ray here: the LLMServer deployment and the latency benchmark both wrap this."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nanovllm_ray.engine.llm_engine import EngineStats, LLMEngine, RequestError, RequestOutput
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class _Abort:
    request_id: str


_STOP = object()


class AsyncEngine:
    """`async for outputs in engine.generate(...)` yields lists of RequestOutput deltas (several steps' worth
    when the reader falls behind); leaving the loop early aborts the request and frees its blocks."""

    def __init__(self, engine: LLMEngine, on_stats: Callable[[EngineStats], None] | None = None,
                 stats_interval_s: float = 0.5) -> None:
        self.engine = engine
        self._on_stats = on_stats
        self._stats_interval_s = stats_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self._num_steps = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._started = False

    # ---- the caller's side (one asyncio loop) -------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}") from self._error
        if not self._started:
            self._loop = asyncio.get_running_loop()
            self._started = True
            self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[list[RequestOutput]]:
        """Outputs of one request as they come. Raises RequestError if the engine refuses the request."""
        self._ensure_started()
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                items = [item]
                while not stream.empty():  # coalesce what piled up while the reader was away
                    items.append(stream.get_nowait())
                error = next((x for x in items if isinstance(x, BaseException)), None)
                if error is not None:
                    finished = True  # refused or the engine died: nothing to abort
                    raise error
                finished = items[-1].finished
                yield items
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The engine's stats as of the last step or command (read on the engine thread)."""
        return self._stats

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop died: {self._error!r}") from self._error
        if self._started and not self._thread.is_alive():
            raise EngineDeadError("the engine loop has stopped")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._commands.put(_STOP)
        if self._started:
            self._thread.join(timeout_s)
        self.engine.shutdown()

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        """On the asyncio loop: hand each output to its request's stream (a request gone away is skipped)."""
        for out in outputs:
            if isinstance(out, tuple):
                rid, item = out
            else:
                rid, item = out.request_id, out
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    def _post(self, outputs: list) -> None:
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _apply(self, cmd) -> list:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
            except (RequestError, ValueError) as e:
                return [(cmd.request_id, e if isinstance(e, RequestError) else RequestError(str(e)))]
        elif isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
        return []

    def _run(self) -> None:
        engine = self.engine
        last_stats = 0.0
        try:
            while True:
                # Block only when there is nothing to step; otherwise take whatever commands are queued.
                busy = engine.has_unfinished_requests()
                cmds = [] if busy else [self._commands.get()]
                while True:
                    try:
                        cmds.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if any(c is _STOP for c in cmds):
                    return
                refused = []
                for c in cmds:
                    refused += self._apply(c)
                self._post(refused)
                if engine.has_unfinished_requests():
                    self._post(engine.step())
                    self._num_steps += 1
                self._stats = engine.stats()
                now = time.monotonic()
                # Metrics at most every stats_interval_s while busy, and always once the engine goes idle.
                if self._on_stats is not None and (now - last_stats >= self._stats_interval_s
                                                   or not engine.has_unfinished_requests()):
                    self._on_stats(self._stats)
                    last_stats = now
        except BaseException as e:  # the engine is in an unknown state: fail every request, stop stepping
            logger.exception("engine loop died")
            self._error = e
            dead = EngineDeadError(f"the engine loop died: {e!r}")
            self._loop.call_soon_threadsafe(
                lambda: [s.put_nowait(dead) for s in list(self._streams.values())])
