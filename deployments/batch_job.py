"""Batch generation as a Ray job: JSONL rows in, JSONL results out, across N engine replicas at once (data
parallel), each replica with its own tensor-parallel group.

    ray job submit --working-dir . -- python -m deployments.batch_job \\
        --model /models/Qwen3-8B --input /data/in.jsonl --output /data/out.jsonl --replicas 4 --tensor-parallel-size 2

Input row (one JSON object a line; a sampling key outside sampling_params gets an error row; other keys are
ignored; the README's "Batch jobs: the row format" has the whole of it):
    {"id": "q1", "prompt": "text" or [token ids]          -- or "messages": [{"role": "user", "content": "..."}]
     "sampling_params": {"temperature": 0, "max_tokens": 64, ...},   (SamplingParams' names; CLI flags give defaults)
     "chat_template_kwargs": {"enable_thinking": false}}              (optional, with messages)
Output row, in the order rows finish:
    {"id": "q1", "text": "...", "token_ids": [...], "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}}
or, for a row that cannot run (no prompt, prompt too long or not tokenizable, bad parameters):
    {"id": "q1", "error": {"message": "...", "type": "invalid_request"}}
and "type": "engine_error" for a row the engine took but could not run (the job goes on).

A row without an id is named by its line number ("line-7"). A rerun skips every id already in the output, so a
crashed or stopped job is resumed by running the same command again.

How it runs: the driver (this process) is the only reader of the input and the only writer of the output. It
streams rows, keeps each EngineReplica actor fed with up to --max-in-flight rows (more than max_num_seqs, so the
engine's waiting queue refills continuous batching the moment a row finishes), and appends each finished row as
one complete JSON line with a single write(2) (fsync every few seconds). A replica runs its engine in a
background thread that never waits for the driver; the driver's one outstanding `poll(new_rows)` call per replica
hands new rows in and finished rows out. A crash loses at most the rows in flight; a torn last line (a write cut
by a machine crash) is cut off at the next start.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nanovllm_ray.config import Config, ConfigError
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm_ray.batch")

INVALID = "invalid_request"  # the error type of a row that cannot run as written
_SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))
# Engine keys with a flag of their own (vLLM's names); any other Config key goes through --engine-kwargs.
_ENGINE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("max_model_len", int, "prompt + output limit (default: the checkpoint's)"),
    ("max_num_seqs", int, "running sequences per replica (default 256)"),
    ("max_num_batched_tokens", int, "tokens per step (default 16384)"),
    ("gpu_memory_utilization", float, "fraction of each GPU for weights, activations and KV (default 0.9)"),
    ("kv_cache_memory_gb", float, "KV pool per replica on CPU (default 1.0)"),
    ("num_kvcache_blocks", int, "force the KV pool size"),
    ("block_size", int, "tokens per KV block (default 16)"),
    ("dtype", str, "auto | float32 | float16 | bfloat16"),
    ("device", str, "auto | cuda | cpu (auto: GPUs when the cluster has them)"),
    ("attention_backend", str, "auto | torch | triton | flash_attn"),
    ("scheduling_policy", str, "mixed | prefill_first"),
    ("seed", int, "global seed"),
)
_ENGINE_SWITCHES = ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager")


# ---- rows ------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Task:
    """One input row that passed the driver's checks, on its way to a replica."""

    key: str  # the id as canonical JSON: the resume key and the engine's request id
    id: Any
    params: SamplingParams
    prompt: str | list[int] | None = None
    chat: Any = None  # a ChatCompletionRequest (messages + chat_template_kwargs) rendered on the replica
    attempts: int = 0


def id_key(row_id: Any) -> str:
    return json.dumps(row_id, sort_keys=True, ensure_ascii=False)


def error_row(row_id: Any, message: str, type: str = INVALID) -> dict[str, Any]:
    return {"id": row_id, "error": {"message": message, "type": type}}


class RowParser:
    """JSON line -> Task, or an error row for a row that cannot run (checked here: everything but the tokenizer's
    part, which the replica checks: the chat template, the prompt's length and token ids)."""

    def __init__(self, default_params: dict[str, Any], chat_template_kwargs: dict[str, Any] | None = None) -> None:
        from pydantic import TypeAdapter

        self._params = TypeAdapter(SamplingParams)  # types per field, then SamplingParams' own range checks
        self.default_params = dict(default_params)
        self.chat_template_kwargs = chat_template_kwargs
        self.parse_params({})  # the defaults themselves must be valid: fail at start, not on every row

    def parse(self, line: str, lineno: int) -> Task | dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return error_row(f"line-{lineno}", f"line {lineno} is not valid JSON: {e}")
        if not isinstance(row, dict):
            return error_row(f"line-{lineno}", f"line {lineno} is a JSON {type(row).__name__}, not an object")
        row_id = row.get("id")
        if row_id is None:
            row_id = f"line-{lineno}"
        try:
            return self._task(row, row_id)
        except ValueError as e:
            return error_row(row_id, str(e))

    def parse_params(self, overrides: Any) -> SamplingParams:
        from pydantic import ValidationError

        if not isinstance(overrides, dict):
            raise ValueError(f"sampling_params must be an object, got {type(overrides).__name__}")
        unknown = sorted(set(overrides) - set(_SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameters {unknown}; known: {list(_SAMPLING_KEYS)}")
        merged = {**self.default_params, **overrides}
        if isinstance(merged.get("stop"), str):
            merged["stop"] = [merged["stop"]]
        try:
            return self._params.validate_python(merged)
        except ValidationError as e:
            raise ValueError(_pydantic_message(e, "sampling_params")) from None

    def _task(self, row: dict[str, Any], row_id: Any) -> Task:
        prompt, messages = row.get("prompt"), row.get("messages")
        if prompt is not None and messages is not None:
            raise ValueError("row has both 'prompt' and 'messages'; give one")
        if prompt is None and messages is None:
            raise ValueError("row has neither 'prompt' (text or token ids) nor 'messages'")
        misplaced = sorted(set(row) & set(_SAMPLING_KEYS))
        if misplaced:
            raise ValueError(f'sampling parameters go under "sampling_params": {misplaced} are at the top level '
                             "of the row")
        params = self.parse_params(row.get("sampling_params") or {})
        key = id_key(row_id)
        if messages is not None:
            return Task(key, row_id, params, chat=self._chat(messages, row.get("chat_template_kwargs")))
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return Task(key, row_id, params, prompt=prompt)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return Task(key, row_id, params, prompt=prompt)
        raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")

    def _chat(self, messages: Any, template_kwargs: Any):
        from pydantic import ValidationError

        from nanovllm_ray.serving.openai_protocol import ChatCompletionRequest

        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        kwargs = template_kwargs if template_kwargs is not None else self.chat_template_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        try:
            return ChatCompletionRequest.model_validate({"messages": messages, "chat_template_kwargs": kwargs})
        except ValidationError as e:
            raise ValueError(_pydantic_message(e, None)) from None


def _pydantic_message(e, prefix: str | None) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        shown = "" if err["type"] == "value_error" else f" (got {err.get('input')!r:.60})"
        parts.append(f"{loc}: {msg}{shown}" if loc else msg)
    return "; ".join(parts)


# ---- the output file -------------------------------------------------------------------------------------------


class ResultWriter:
    """Appends finished rows to the output, one complete line per row; the job's only writer.

    On open it reads the ids already written (the rerun skips them) and cuts off a torn last line. A batch of
    rows goes out as one write(2) on an O_APPEND descriptor: a killed process leaves whole lines, and what was
    written survives the process (fsync every `fsync_interval_s` guards against losing the machine too). An
    exclusive flock keeps a second job on this node from appending to the same file.
    """

    def __init__(self, path: str, fsync_interval_s: float = 5.0) -> None:
        self.path = path
        self.fsync_interval_s = fsync_interval_s
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RuntimeError(f"{path} is locked: another batch job on this node is writing it") from None
        self.done_keys, self.torn_bytes, self.bad_lines = self._recover()
        self._last_sync = time.monotonic()

    def _recover(self) -> tuple[set[str], int, int]:
        done: set[str] = set()
        bad = 0
        size = os.fstat(self.fd).st_size
        end = 0  # offset just past the last complete line
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last line: rerun that row
                end += len(line)
                try:
                    row = json.loads(line)
                    done.add(id_key(row["id"]))
                except (ValueError, KeyError, TypeError):
                    bad += 1
        if end < size:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        if bad:
            logger.warning("%s: %d lines are not result rows; left as they are", self.path, bad)
        return done, size - end, bad

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        view = memoryview(data)
        while view:  # a regular file takes it whole unless the disk is full
            view = view[os.write(self.fd, view):]
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval_s:
            os.fsync(self.fd)
            self._last_sync = now

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


# ---- one replica -----------------------------------------------------------------------------------------------


class EngineReplica:
    """One engine (scheduler, KV cache, its ranks) as a Ray actor; the driver makes it an actor with
    `ray.remote(EngineReplica)`. With one rank the model runs in this process; with more, RayExecutor places one
    rank actor on each bundle of this replica's placement group.

    The engine runs the one engine loop (nanovllm_ray.engine.async_engine.EngineLoop), which steps whenever it has
    work; `poll` hands new rows in and finished rows out, and turns the loop's token reports into rows through the
    shared output path (RequestState: text, stop strings, usage) on its own thread, so the driver's round trips
    never stall the engine.
    """

    def __init__(self, model: str, engine_kwargs: dict[str, Any], use_ray_executor: bool = False,
                 dispatch: str = "compiled", worker_num_cpus: float = 1.0, placement_group=None,
                 step_delay_s: float = 0.0) -> None:
        from nanovllm_ray.engine.async_engine import EngineLoop
        from nanovllm_ray.engine.llm_engine import LLMEngine
        from nanovllm_ray.engine.output import OutputProcessor
        from nanovllm_ray.serving.request_processor import RequestProcessor

        config = Config.from_kwargs(model, **engine_kwargs)
        executor = None
        if use_ray_executor:
            from nanovllm_ray.executor.ray_executor import RayExecutor

            executor = RayExecutor(config, dispatch=dispatch, placement_group=placement_group,
                                   worker_num_cpus=worker_num_cpus)
        self.engine = LLMEngine(config, executor=executor)
        # The service's chat-template handling, so a batch row renders exactly as a chat request would.
        self.processor = RequestProcessor(self.engine.tokenizer, "batch", self.engine.max_model_len,
                                          self.engine.vocab_size)
        self.outputs = OutputProcessor(self.engine.tokenizer)
        self.tasks: dict[str, Task] = {}
        self.step_delay_s = step_delay_s
        self._warm_up()
        self._cond = threading.Condition()
        self._reports: list = []
        self._error: BaseException | None = None
        self.loop = EngineLoop(self.engine, self._on_report, self._on_dead)
        self.loop.start()

    def _warm_up(self) -> None:
        # First steps compile kernels and fill caches: pay for that before the replica reports ready.
        self.engine.add_request("warm-up", [0, 1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2))
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def info(self) -> dict[str, Any]:
        import ray

        ex = self.engine.executor
        return {"node": ray.util.get_node_ip_address(), "device": str(getattr(ex, "device", "?")),
                "tensor_parallel_size": self.engine.config.tensor_parallel_size,
                "num_kv_blocks": self.engine.block_manager.num_blocks, "max_model_len": self.engine.max_model_len}

    def poll(self, tasks: list[Task], timeout_s: float = 1.0) -> list[tuple[str, dict[str, Any]]]:
        """Add `tasks`, then return the rows finished since the last call as (key, output row): as soon as there
        is one, or after `timeout_s` with none. Raises if the engine loop died (the driver retries its rows)."""
        rows = self._add(tasks)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                reports, self._reports = self._reports, []
                error = self._error
            rows += self._rows(reports)
            if rows or error is not None or time.monotonic() >= deadline:
                break
            with self._cond:
                self._cond.wait_for(lambda: self._reports or self._error is not None, deadline - time.monotonic())
        if error is not None and not rows:
            raise RuntimeError(f"the engine loop died: {error!r}") from error
        return rows

    def shutdown(self) -> None:
        self.loop.stop(30)
        self.engine.shutdown()

    def _add(self, tasks: list[Task]) -> list[tuple[str, dict[str, Any]]]:
        """Send the tasks to the engine loop; an error row for each that cannot even be rendered."""
        rows, cmds = [], []
        for t in tasks:
            try:
                prompt = t.prompt if t.chat is None else self.processor.render_chat(t.chat)
            except Exception as e:  # OpenAIError from the chat template, or whatever the row's content raises
                rows.append((t.key, error_row(t.id, str(e))))
                continue
            self.tasks[t.key] = t
            self.outputs.add(t.key, t.params)
            cmds.append(("add", t.key, prompt, t.params))
        self.loop.submit(cmds)
        return rows

    def _rows(self, reports: list) -> list[tuple[str, dict[str, Any]]]:
        from nanovllm_ray.engine.async_engine import ERROR, REFUSED
        from nanovllm_ray.engine.output import RequestOutput

        rows = []
        for report in reports:
            outs = [RequestOutput.unpack(t) for t in report.outputs]
            finished, stopped = self.outputs.process(outs)
            if stopped:  # a stop string ended them: free their blocks
                self.loop.submit([("abort", rid) for rid in stopped])
            for state in finished:
                task = self.tasks.pop(state.request_id)
                if state.finish_reason == REFUSED:  # too long, a token outside the vocabulary, untokenizable
                    rows.append((task.key, error_row(task.id, state.error)))
                elif state.finish_reason == ERROR:  # the engine took it but could not run it: this row only
                    rows.append((task.key, error_row(task.id, state.error, "engine_error")))
                else:
                    rows.append((task.key, _result_row(task, state)))
        return rows

    # -- the engine thread

    def _on_report(self, report) -> None:
        with self._cond:
            self._reports.append(report)
            self._cond.notify_all()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)  # tests: slow the job down enough to kill it mid-way

    def _on_dead(self, error: BaseException) -> None:  # the engine's state is unknown: the driver retries the rows
        with self._cond:
            self._error = error
            self._cond.notify_all()


def _result_row(task: Task, state) -> dict[str, Any]:
    n_prompt, n_gen = state.num_prompt_tokens, state.num_generated_tokens
    row: dict[str, Any] = {
        "id": task.id, "text": state.text, "token_ids": state.token_ids, "finish_reason": state.finish_reason,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
                  "prompt_tokens_details": {"cached_tokens": state.num_cached_tokens}}}
    if state.stop_reason is not None:
        row["stop_reason"] = state.stop_reason
    if task.params.logprobs is not None:
        row["logprobs"] = state.logprobs  # per token: [chosen logprob, [[token id, logprob], ...top k]]
    return row


# ---- the driver ------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    input: str
    output: str
    rows_total: int = 0  # non-empty lines of the input
    rows_skipped: int = 0  # already in the output from an earlier run
    rows_written: int = 0  # this run: results and error rows
    rows_ok: int = 0
    rows_invalid: int = 0  # error rows: the row cannot run as written
    rows_failed: int = 0  # not written: the replicas they ran on kept dying; a rerun retries them
    rows_not_run: int = 0  # not written: the job stopped before they finished; a rerun runs them
    duplicate_ids: int = 0  # rows whose id came earlier in the input: not run
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0  # the whole run, start-up included
    generation_s: float = 0.0  # first replica ready -> last row written
    completion_tokens_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    replicas: int = 0
    tensor_parallel_size: int = 1
    replica_restarts: int = 0
    torn_bytes_truncated: int = 0
    stopped_by_signal: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Replica:
    index: int
    actor: Any
    pg: Any  # its placement group when its ranks are actors
    ready_ref: Any  # the info() call, until the replica is up
    ready: bool = False
    call_ref: Any = None  # the outstanding poll()
    in_flight: dict[str, Task] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class BatchJob:
    """The driver: streams rows to replicas, writes what comes back, retries the rows of a replica that dies."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine_kwargs = engine_kwargs(args)
        self.model = os.path.abspath(args.model)
        self.parser = RowParser(default_sampling_params(args),
                                _json_arg(args.chat_template_kwargs, "chat-template-kwargs"))
        if os.path.isdir(self.model):
            Config.from_kwargs(self.model, **self.engine_kwargs)  # a bad value fails here, before any actor starts
        else:
            logger.warning("%s is not on the driver's node; each replica's node must have it", self.model)
        self.tp = args.tensor_parallel_size
        self.use_ray_executor = args.executor == "ray" or (args.executor == "auto" and self.tp > 1)
        self.max_in_flight = args.max_in_flight or 2 * self.engine_kwargs.get("max_num_seqs", 256)
        self.use_gpu = False
        self.summary = Summary(os.path.abspath(args.input), os.path.abspath(args.output), replicas=args.replicas,
                               tensor_parallel_size=self.tp)
        self.replicas: list[_Replica] = []
        self.pending: deque[Task] = deque()  # taken from the input or from a failed replica, not yet handed out
        self.seen: set[str] = set()
        self.source: Iterator[Task | dict[str, Any]] = iter(())
        self.source_done = False
        self.restarts_left = args.max_replica_restarts
        self.stop_signal: int | None = None
        self.writer = ResultWriter(args.output, args.fsync_interval_s)  # reads what is written; locks the file
        self.bar = None
        self._t_start = time.monotonic()
        self._t_gen: float | None = None
        self._next_log = time.monotonic() + args.log_interval_s

    # -- replicas

    def _start_replica(self, index: int) -> _Replica:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        a = self.args
        pg = None
        # poll() blocks for up to a second: a second thread answers info() and shutdown() meanwhile.
        options: dict[str, Any] = {"max_concurrency": 2, "max_restarts": 0}
        if self.use_ray_executor:
            # One bundle per rank on one node (STRICT_PACK); the replica shares bundle 0 with rank 0.
            bundle = {"CPU": a.worker_num_cpus, **({"GPU": 1} if self.use_gpu else {})}
            pg = placement_group([dict(bundle) for _ in range(self.tp)], strategy="STRICT_PACK")
            options.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
        else:
            options.update(num_cpus=a.replica_num_cpus, num_gpus=1 if self.use_gpu else 0)
        actor = ray.remote(EngineReplica).options(**options).remote(
            self.model, self.engine_kwargs, self.use_ray_executor, a.dispatch, a.worker_num_cpus, pg, a.step_delay_s)
        return _Replica(index, actor, pg, actor.info.remote())

    def replica_needs(self) -> dict[str, float]:
        if self.use_ray_executor:
            return {"CPU": self.args.worker_num_cpus * self.tp, **({"GPU": self.tp} if self.use_gpu else {})}
        return {"CPU": self.args.replica_num_cpus, **({"GPU": 1} if self.use_gpu else {})}

    def _fail(self, r: _Replica, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0]
        logger.error("replica %d failed with %d rows in flight: %s: %s", r.index, len(r.in_flight),
                     type(error).__name__, first_line)
        self.replicas.remove(r)
        _release(r)
        for t in r.in_flight.values():
            t.attempts += 1
            if t.attempts >= self.args.max_row_attempts:
                self.summary.rows_failed += 1
                logger.error("row %s failed on %d replicas: not written (a rerun retries it)", t.key, t.attempts)
            else:
                self.pending.appendleft(t)
        # A replica that never came up usually cannot (a wrong path, too little memory): replace only those that ran.
        if r.ready and self.restarts_left > 0 and self.stop_signal is None:
            self.restarts_left -= 1
            self.summary.replica_restarts += 1
            logger.warning("starting a replacement for replica %d (%d restarts left)", r.index, self.restarts_left)
            self.replicas.append(self._start_replica(r.index))

    # -- rows

    def _rows(self) -> Iterator[Task | dict[str, Any]]:
        """Input rows not yet written: Tasks, and error rows for those that cannot run."""
        done = self.writer.done_keys
        with open(self.args.input, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = self.parser.parse(line, lineno)
                key = item.key if isinstance(item, Task) else id_key(item["id"])
                if key in done:
                    self.summary.rows_skipped += 1
                    self.bar.update(1)
                elif key in self.seen:
                    self.summary.duplicate_ids += 1
                    if self.summary.duplicate_ids <= 5:
                        logger.warning("line %d: id %s came earlier in the input: skipped", lineno, key)
                    self.bar.update(1)
                else:
                    self.seen.add(key)
                    yield item

    def _take(self, n: int, out: list[dict[str, Any]]) -> list[Task]:
        """Up to n Tasks to run; error rows met on the way go to `out`, written with the next batch."""
        tasks: list[Task] = []
        while len(tasks) < n and self.pending:
            tasks.append(self.pending.popleft())
        while len(tasks) < n and not self.source_done:
            item = next(self.source, None)
            if item is None:
                self.source_done = True
            elif isinstance(item, Task):
                tasks.append(item)
            else:
                out.append(item)
        return tasks

    def _feed(self, r: _Replica, out: list[dict[str, Any]]) -> None:
        """Top the replica up to max_in_flight rows and ask for what it has finished (one call outstanding)."""
        tasks = self._take(self.max_in_flight - len(r.in_flight), out)
        for t in tasks:
            r.in_flight[t.key] = t
        if r.in_flight:
            r.call_ref = r.actor.poll.remote(tasks, 1.0)

    def _record(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.writer.write(rows)
        s = self.summary
        for row in rows:
            s.rows_written += 1
            if "error" in row:
                s.rows_invalid += 1
                continue
            s.rows_ok += 1
            u = row["usage"]
            s.prompt_tokens += u["prompt_tokens"]
            s.completion_tokens += u["completion_tokens"]
            s.cached_tokens += u["prompt_tokens_details"]["cached_tokens"]
        self.bar.update(len(rows))

    # -- the run

    def run(self) -> Summary:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        a = self.args
        self.summary.torn_bytes_truncated = self.writer.torn_bytes
        if self.writer.torn_bytes:
            logger.warning("%s ended in a torn line (%d bytes): cut off; its row runs again", a.output,
                           self.writer.torn_bytes)
        with open(a.input, encoding="utf-8") as f:
            self.summary.rows_total = sum(1 for line in f if line.strip())
        # A live bar on a terminal; a job log (not a terminal) gets the bar in each progress line instead.
        self.bar = tqdm(total=self.summary.rows_total, unit="row", desc="batch", dynamic_ncols=True,
                        disable=a.no_progress_bar or not sys.stderr.isatty())
        self.source = self._rows()
        previous = self._catch_signals()
        try:
            with logging_redirect_tqdm([logging.getLogger()]):  # log lines print above the bar, not into it
                self._run()
        finally:
            self.bar.close()
            self._shutdown()
            self.writer.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._finish()

    def _catch_signals(self) -> dict[int, Any]:
        """SIGTERM (`ray job stop`) and SIGINT stop the job between rows: what is written stays, a rerun resumes.
        Called again after ray.init, whose core worker installs a SIGTERM handler of its own."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is None:
            logger.warning("%s: stopping; the rows written are kept and a rerun resumes", signal.Signals(signum).name)
        self.stop_signal = signum

    def _run(self) -> None:
        import ray

        a = self.args
        s = self.summary
        logger.info("%s -> %s: %d rows, %d already written; %d replicas x tp=%d of %s", s.input, s.output,
                    s.rows_total, len(self.writer.done_keys), a.replicas, self.tp, self.model)
        out: list[dict[str, Any]] = []
        self.pending.extend(self._take(1, out))  # a rerun with nothing left to run starts no replica
        self._record(out)
        if not self.pending:
            logger.info("nothing to run: every row of the input is in the output")
            return
        if not ray.is_initialized():
            ray.init(address=a.address, logging_level="WARNING")
            self._catch_signals()
        self.use_gpu = _use_gpu(self.engine_kwargs.get("device", "auto"))
        self.replicas = [self._start_replica(i) for i in range(a.replicas)]
        logger.info("each replica needs %s; the cluster has %s (%s free)", self.replica_needs(),
                    _cluster_resources(), _resources(ray.available_resources()))
        self._loop()

    def _loop(self) -> None:
        import ray

        while self.stop_signal is None and self.replicas and not self._all_done():
            out: list[dict[str, Any]] = []
            refs = {}
            for r in self.replicas:
                ref = r.call_ref if r.ready else r.ready_ref
                if ref is not None:
                    refs[ref] = r
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0) if refs else ([], [])
            for ref in ready:
                r = refs[ref]
                try:
                    value = ray.get(ref)
                except (ray.exceptions.RayError, RuntimeError) as e:  # the actor died, or its engine loop did
                    self._fail(r, e)
                    continue
                if not r.ready:
                    r.ready, r.ready_ref = True, None
                    if self._t_gen is None:
                        self._t_gen = time.monotonic()
                    logger.info("replica %d ready in %.1f s: %s", r.index, time.monotonic() - r.started, value)
                else:
                    r.call_ref = None
                    for key, row in value:
                        r.in_flight.pop(key, None)
                        out.append(row)
                self._feed(r, out)
            # A replica is idle once the input had nothing more for it; rows of a failed replica wait in
            # `pending` for one.
            for r in self.replicas:
                if r.ready and r.call_ref is None and self.pending:
                    self._feed(r, out)
            self._record(out)
            self._check_startup()
            self._progress()
        if self.stop_signal is None and not self.replicas:
            logger.error("no replica left: stopping with rows not written")

    def _all_done(self) -> bool:
        return self.source_done and not self.pending and not any(r.in_flight for r in self.replicas)

    def _check_startup(self) -> None:
        if not self.replicas or any(r.ready for r in self.replicas):
            return
        age = time.monotonic() - min(r.started for r in self.replicas)
        if age > self.args.startup_timeout_s:
            logger.error("no replica started within %.0f s; each needs %s, the cluster has %s",
                         self.args.startup_timeout_s, self.replica_needs(), _cluster_resources())
            for r in self.replicas:
                _release(r)
            self.replicas = []

    def _progress(self) -> None:
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + self.args.log_interval_s
        s = self.summary
        handled = s.rows_written + s.rows_skipped + s.duplicate_ids + s.rows_failed
        gen_s = now - self._t_gen if self._t_gen else 0.0
        rate = s.completion_tokens / gen_s if gen_s > 0 else 0.0
        in_flight = sum(len(r.in_flight) for r in self.replicas)
        ready = sum(r.ready for r in self.replicas)
        todo = s.rows_total - handled
        eta = f", eta {_duration(todo * gen_s / s.rows_written)}" if s.rows_written and todo > 0 else ""
        frac = handled / s.rows_total if s.rows_total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))  # the job log's progress bar: one line per interval
        logger.info("progress: [%s] %d/%d rows (%.1f%%), %d in flight on %d/%d replicas ready, %.1f generated tok/s, "
                    "%d invalid, %d failed, elapsed %s%s", bar, handled, s.rows_total, 100 * frac, in_flight, ready,
                    len(self.replicas), rate, s.rows_invalid, s.rows_failed, _duration(now - self._t_start), eta)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", invalid=s.rows_invalid, failed=s.rows_failed, refresh=False)

    def _shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        # Idle replicas shut their engines down (rank actors, compiled graphs); busy ones (a stop) are killed.
        idle = [r for r in self.replicas if r.ready and r.call_ref is None]
        refs = [r.actor.shutdown.remote() for r in idle]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=30) if refs else ([], [])
        for r in self.replicas:
            if r.ready and r.call_ref is None and refs[idle.index(r)] in done:
                ray.get(refs[idle.index(r)])  # the actor itself exits with this driver
                if r.pg is not None:
                    remove_placement_group(r.pg)
            else:
                _release(r)
        self.replicas = []

    def _finish(self) -> Summary:
        s = self.summary
        now = time.monotonic()
        s.elapsed_s = round(now - self._t_start, 3)
        s.generation_s = round(now - self._t_gen, 3) if self._t_gen else 0.0
        if s.generation_s > 0:
            s.completion_tokens_per_s = round(s.completion_tokens / s.generation_s, 1)
            s.total_tokens_per_s = round((s.prompt_tokens + s.completion_tokens) / s.generation_s, 1)
        # Every input row is written, skipped, a duplicate, failed, or not reached before a stop.
        s.rows_not_run = max(0, s.rows_total - (s.rows_written + s.rows_skipped + s.duplicate_ids + s.rows_failed))
        if self.stop_signal is not None:
            s.stopped_by_signal = signal.Signals(self.stop_signal).name
        logger.info("%s: %d rows, %s -> %s", f"stopped by {s.stopped_by_signal}" if s.stopped_by_signal else "done",
                    s.rows_total, s.input, s.output)
        logger.info("summary: rows %d written this run (%d ok, %d invalid), %d already written, %d failed, %d not run, "
                    "%d duplicate ids", s.rows_written, s.rows_ok, s.rows_invalid, s.rows_skipped, s.rows_failed,
                    s.rows_not_run, s.duplicate_ids)
        logger.info("summary: tokens %d prompt (%d cached), %d generated in %.2f s (%.2f s with start-up): "
                    "%.1f generated tok/s, %.1f total tok/s; %d replicas x tp=%d, %d restarts", s.prompt_tokens,
                    s.cached_tokens, s.completion_tokens, s.generation_s, s.elapsed_s, s.completion_tokens_per_s,
                    s.total_tokens_per_s, s.replicas, s.tensor_parallel_size, s.replica_restarts)
        if s.rows_failed or s.rows_not_run:
            logger.warning("run the same command again to finish the %d rows not written",
                           s.rows_failed + s.rows_not_run)
        if self.args.summary:
            with open(self.args.summary, "w") as f:
                json.dump(s.as_dict(), f, indent=2)
        return s


def _release(r: _Replica) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        ray.kill(r.actor)  # its rank actors go with it (they are its children)
    except Exception:  # already gone
        pass
    if r.pg is not None:
        remove_placement_group(r.pg)


def _use_gpu(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _resources(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in res.items() if k in ("CPU", "GPU")}


def _cluster_resources() -> dict[str, float]:
    import ray

    return _resources(ray.cluster_resources())


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the command line ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.batch_job", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False,
                                epilog="Input and output rows: see the module docstring or the README.")
    io = p.add_argument_group("data")
    io.add_argument("--model", required=True, help="Hugging Face Qwen3 directory, present on every replica's node")
    io.add_argument("--input", required=True, help="JSONL rows (absolute path under `ray job submit`)")
    io.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    io.add_argument("--summary", default=None, help="write the closing summary as JSON here")

    par = p.add_argument_group("parallelism")
    par.add_argument("--replicas", type=int, default=1, help="engine replicas at once (data parallel)")
    par.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks (GPUs) per replica")
    par.add_argument("--executor", choices=("auto", "inprocess", "ray"), default="auto",
                     help="auto: one rank runs in the replica's process, more run as Ray actors")
    par.add_argument("--dispatch", choices=("compiled", "remote"), default="compiled",
                     help="how a replica sends each step to its rank actors")
    par.add_argument("--replica-num-cpus", type=float, default=1.0, help="CPUs of a one-rank replica")
    par.add_argument("--worker-num-cpus", type=float, default=1.0, help="CPUs of each rank's bundle (tp > 1)")
    par.add_argument("--max-in-flight", type=int, default=None,
                     help="rows handed to a replica at once (default: 2 x max_num_seqs); a crash loses these")

    eng = p.add_argument_group("engine (nanovllm_ray.Config; defaults are the engine's)")
    for name, typ, help_ in _ENGINE_FLAGS:
        eng.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    for name in _ENGINE_SWITCHES:
        eng.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)
    eng.add_argument("--engine-kwargs", default=None, help="JSON object of any other Config key")

    sp = p.add_argument_group("default sampling parameters (a row's sampling_params override them)")
    sp.add_argument("--temperature", type=float, default=None, help="0 is greedy (SamplingParams' default: 1.0)")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--max-tokens", type=int, default=None, help="SamplingParams' default: 16")
    sp.add_argument("--sampling-params", default=None, help='JSON object, e.g. \'{"top_k": 20, "stop": ["\\n"]}\'')
    sp.add_argument("--chat-template-kwargs", default=None, help='JSON object, e.g. \'{"enable_thinking": false}\'')

    run = p.add_argument_group("running")
    run.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, the running cluster, or a "
                                                     "new local one; 'local' for a new one)")
    run.add_argument("--max-row-attempts", type=int, default=2,
                     help="replicas a row may fail on before it is counted failed (not written; a rerun retries)")
    run.add_argument("--max-replica-restarts", type=int, default=2, help="replacements for replicas that die")
    run.add_argument("--startup-timeout-s", type=float, default=1800.0,
                     help="give up if no replica is ready by then (e.g. the cluster never gets the GPUs)")
    run.add_argument("--log-interval-s", type=float, default=10.0, help="seconds between progress lines")
    run.add_argument("--fsync-interval-s", type=float, default=5.0)
    run.add_argument("--no-progress-bar", action="store_true", help="only the progress lines")
    run.add_argument("--step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow engine
    return p


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(_json_arg(args.engine_kwargs, "engine-kwargs") or {})
    both = sorted(set(kwargs) & ({n for n, _, _ in _ENGINE_FLAGS} | set(_ENGINE_SWITCHES) | {"tensor_parallel_size"}))
    if both:
        raise ConfigError(f"--engine-kwargs sets {both}: use their own flags")
    for name in [n for n, _, _ in _ENGINE_FLAGS] + list(_ENGINE_SWITCHES):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    return kwargs


def default_sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(_json_arg(args.sampling_params, "sampling-params") or {})
    for name in ("temperature", "top_p", "max_tokens"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return params


def _json_arg(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{flag} must be a JSON object, got {text!r}")
    return value


def check_args(args: argparse.Namespace) -> None:
    """Errors a user can make on the command line, named with the value and the limit."""
    for name, low in (("replicas", 1), ("tensor_parallel_size", 1), ("max_row_attempts", 1),
                      ("max_replica_restarts", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise ConfigError(f"--max-in-flight={args.max_in_flight} must be >= 1")
    if args.replica_num_cpus < 0 or args.worker_num_cpus <= 0:
        raise ConfigError(f"--replica-num-cpus={args.replica_num_cpus} must be >= 0 and --worker-num-cpus="
                          f"{args.worker_num_cpus} > 0")
    if args.executor == "inprocess" and args.tensor_parallel_size > 1:
        raise ConfigError(f"--executor inprocess runs one rank; --tensor-parallel-size={args.tensor_parallel_size} "
                          "needs the ray executor (or auto)")
    if not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input!r} is not a file")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ConfigError("--output must not be the input file")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [batch] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        job = BatchJob(args)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:  # a bad flag, an unreadable or locked file
        logger.error("%s", e)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = job.run()
    if job.stop_signal is not None:
        return 128 + job.stop_signal
    return 1 if summary.rows_failed or summary.rows_not_run else 0


if __name__ == "__main__":
    # Run as deployments.batch_job (not __main__), so the replica actors import EngineReplica by its module name.
    from deployments.batch_job import main as _main

    sys.exit(_main())
