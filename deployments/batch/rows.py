"""Batch job rows: the input line parser (a Task to run, or an error row), the result and error rows, and the
output file (append-only JSONL, resumable). No Ray here: the driver and the replicas both use it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Any

from nanovllm_ray.engine.output import RequestState
from nanovllm_ray.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm_ray.batch")

INVALID = "invalid_request"  # the error type of a row that cannot run as written
ENGINE_ERROR = "engine_error"  # a row the engine took but could not run
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


# ---- rows in -------------------------------------------------------------------------------------------------


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
        unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameters {unknown}; known: {list(SAMPLING_KEYS)}")
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
        misplaced = sorted(set(row) & set(SAMPLING_KEYS))
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


def result_row(task: Task, state: RequestState) -> dict[str, Any]:
    """A finished request's output row (the shared output path's RequestState: text, tokens, usage)."""
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


# ---- the output file -----------------------------------------------------------------------------------------


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
