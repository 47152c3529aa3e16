"""The batch job's driver: the only reader of the input and the only writer of the output. It streams rows,
keeps each EngineReplica actor fed with up to max_in_flight rows (more than max_num_seqs, so that the engine's
waiting queue refills continuous batching the moment a row finishes), and appends each finished row as one
complete JSON line with a single write(2) (fsync every few seconds). The driver's one outstanding
`poll(new_rows)` call per replica hands new rows in and finished rows out. A crash loses at most the rows in
flight; a torn last line (a write cut by a machine crash) is cut off at the next start; a rerun resumes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from deployments.batch.replica import EngineReplica
from deployments.batch.rows import ResultWriter, RowParser, Task, id_key
from nanovllm_ray.config import Config, ConfigError, ranks_as_actors

logger = logging.getLogger("nanovllm_ray.batch")


@dataclass
class JobOptions:
    """How a job runs, besides what it runs (the CLI's parallelism and running flags, as values)."""

    replicas: int = 1  # engine replicas at once (data parallel)
    replica_num_cpus: float = 1.0  # CPUs of a one-rank replica
    max_in_flight: int | None = None  # rows handed to a replica at once (default: 2 x max_num_seqs)
    max_row_attempts: int = 2  # replicas a row may fail on before it is counted failed
    max_replica_restarts: int = 2  # replacements for replicas that die
    startup_timeout_s: float = 1800.0  # give up if no replica is ready by then
    log_interval_s: float = 10.0
    fsync_interval_s: float = 5.0
    progress_bar: bool = True
    address: str | None = None  # Ray address (default: RAY_ADDRESS, the running cluster, or a new local one)
    summary: str | None = None  # write the closing summary as JSON here
    step_delay_s: float = 0.0  # tests: a pause after each engine step

    def check(self) -> None:
        for name, low in (("replicas", 1), ("max_row_attempts", 1), ("max_replica_restarts", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight={self.max_in_flight} must be >= 1")
        if self.replica_num_cpus < 0:
            raise ConfigError(f"replica_num_cpus={self.replica_num_cpus} must be >= 0")


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

    def __init__(self, model: str, input: str, output: str, engine: dict[str, Any] | None = None,
                 sampling_defaults: dict[str, Any] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                 options: JobOptions | None = None) -> None:
        """model: a Hugging Face Qwen3 directory (present on every replica's node); engine: nanovllm_ray.Config
        settings; sampling_defaults: SamplingParams values a row's sampling_params override."""
        self.options = o = options or JobOptions()
        o.check()
        if not os.path.isfile(input):
            raise ConfigError(f"input {input!r} is not a file")
        if os.path.abspath(input) == os.path.abspath(output):
            raise ConfigError("the output must not be the input file")
        self.model = os.path.abspath(model)
        self.engine = dict(engine or {})
        self.input, self.output = os.path.abspath(input), os.path.abspath(output)
        self.parser = RowParser(sampling_defaults or {}, chat_template_kwargs)
        if os.path.isdir(self.model):
            Config.from_kwargs(self.model, **self.engine)  # a bad value fails here, before any actor starts
        else:
            logger.warning("%s is not on the driver's node; each replica's node must have it", self.model)
        self.tp = self.engine.get("tensor_parallel_size", Config.default("tensor_parallel_size"))
        self.use_rank_actors = ranks_as_actors(self.engine.get("executor", Config.default("executor")), self.tp)
        self.worker_num_cpus = self.engine.get("worker_num_cpus", Config.default("worker_num_cpus"))
        self.max_in_flight = o.max_in_flight or 2 * self.engine.get("max_num_seqs", Config.default("max_num_seqs"))
        self.use_gpu = False
        self.summary = Summary(self.input, self.output, replicas=o.replicas, tensor_parallel_size=self.tp)
        self.replicas: list[_Replica] = []
        self.pending: deque[Task] = deque()  # taken from the input or from a failed replica, not yet handed out
        self.seen: set[str] = set()
        self.source: Iterator[Task | dict[str, Any]] = iter(())
        self.source_done = False
        self.restarts_left = o.max_replica_restarts
        self.stop_signal: int | None = None
        self.writer = ResultWriter(self.output, o.fsync_interval_s)  # reads what is written; locks the file
        self.bar = None
        self._t_start = time.monotonic()
        self._t_gen: float | None = None
        self._next_log = time.monotonic() + o.log_interval_s

    # -- replicas

    def _start_replica(self, index: int) -> _Replica:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = None
        # poll() blocks for up to a second: a second thread answers info() and shutdown() meanwhile.
        options: dict[str, Any] = {"max_concurrency": 2, "max_restarts": 0}
        if self.use_rank_actors:
            # One bundle per rank on one node (STRICT_PACK); the replica shares bundle 0 with rank 0, and its
            # executor places the rank actors in this group (child capture).
            bundle = {"CPU": self.worker_num_cpus, **({"GPU": 1} if self.use_gpu else {})}
            pg = placement_group([dict(bundle) for _ in range(self.tp)], strategy="STRICT_PACK")
            options.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
        else:
            options.update(num_cpus=self.options.replica_num_cpus, num_gpus=1 if self.use_gpu else 0)
        actor = ray.remote(EngineReplica).options(**options).remote(self.model, self.engine,
                                                                      self.options.step_delay_s)
        return _Replica(index, actor, pg, actor.info.remote())

    def replica_needs(self) -> dict[str, float]:
        if self.use_rank_actors:
            return {"CPU": self.worker_num_cpus * self.tp, **({"GPU": self.tp} if self.use_gpu else {})}
        return {"CPU": self.options.replica_num_cpus, **({"GPU": 1} if self.use_gpu else {})}

    def _fail(self, r: _Replica, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0]
        logger.error("replica %d failed with %d rows in flight: %s: %s", r.index, len(r.in_flight),
                     type(error).__name__, first_line)
        self.replicas.remove(r)
        _release(r)
        for t in r.in_flight.values():
            t.attempts += 1
            if t.attempts >= self.options.max_row_attempts:
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
        with open(self.input, encoding="utf-8") as f:
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

        self.summary.torn_bytes_truncated = self.writer.torn_bytes
        if self.writer.torn_bytes:
            logger.warning("%s ended in a torn line (%d bytes): cut off; its row runs again", self.output,
                           self.writer.torn_bytes)
        with open(self.input, encoding="utf-8") as f:
            self.summary.rows_total = sum(1 for line in f if line.strip())
        # A live bar on a terminal; a job log (not a terminal) gets the bar in each progress line instead.
        self.bar = tqdm(total=self.summary.rows_total, unit="row", desc="batch", dynamic_ncols=True,
                        disable=not self.options.progress_bar or not sys.stderr.isatty())
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

        o = self.options
        s = self.summary
        logger.info("%s -> %s: %d rows, %d already written; %d replicas x tp=%d of %s", s.input, s.output,
                    s.rows_total, len(self.writer.done_keys), o.replicas, self.tp, self.model)
        out: list[dict[str, Any]] = []
        self.pending.extend(self._take(1, out))  # a rerun with nothing left to run starts no replica
        self._record(out)
        if not self.pending:
            logger.info("nothing to run: every row of the input is in the output")
            return
        if not ray.is_initialized():
            ray.init(address=o.address, logging_level="WARNING")
            self._catch_signals()
        self.use_gpu = _use_gpu(self.engine.get("device", Config.default("device")))
        self.replicas = [self._start_replica(i) for i in range(o.replicas)]
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
        if age > self.options.startup_timeout_s:
            logger.error("no replica started within %.0f s; each needs %s, the cluster has %s",
                         self.options.startup_timeout_s, self.replica_needs(), _cluster_resources())
            for r in self.replicas:
                _release(r)
            self.replicas = []

    def _progress(self) -> None:
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + self.options.log_interval_s
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
        if self.options.summary:
            with open(self.options.summary, "w") as f:
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
