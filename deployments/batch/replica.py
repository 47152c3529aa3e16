"""The batch job's engine replica: one engine (scheduler, KV cache, its ranks) as a Ray actor, running the one
engine loop (nanovllm_ray.engine.async_engine.EngineLoop) and the shared output path."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from deployments.batch.rows import ENGINE_ERROR, Task, error_row, result_row
from nanovllm_ray.config import Config
from nanovllm_ray.engine.async_engine import ERROR, REFUSED, EngineLoop
from nanovllm_ray.engine.output import RequestOutput
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm_ray.batch")


class EngineReplica:
    """One engine (scheduler, KV cache, its ranks) as a Ray actor; the driver makes it an actor with
    `ray.remote(EngineReplica)`. With one rank the model runs in this process; with more, RayExecutor places one
    rank actor on each bundle of this replica's placement group.

    The engine runs the one engine loop (nanovllm_ray.engine.async_engine.EngineLoop), which steps whenever it has
    work; `poll` hands new rows in and finished rows out, and turns the loop's token reports into rows through the
    shared output path (RequestState: text, stop strings, usage) on its own thread, so the driver's round trips
    never stall the engine.
    """

    def __init__(self, model: str, engine: dict[str, Any], step_delay_s: float = 0.0) -> None:
        """model, engine: the Config to build here (this replica's node holds the model; the driver's may not)."""
        from nanovllm_ray.engine.llm_engine import LLMEngine
        from nanovllm_ray.engine.output import OutputProcessor
        from nanovllm_ray.serving.request_processor import RequestProcessor

        # The executor is config.executor's; rank actors join this actor's placement group (child capture).
        self.engine = LLMEngine(Config.from_kwargs(model, **engine))
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
                    rows.append((task.key, error_row(task.id, state.error, ENGINE_ERROR)))
                else:
                    rows.append((task.key, result_row(task, state)))
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
