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

The code is the package deployments.batch (rows.py, replica.py, driver.py, cli.py); this module is its command.

How it runs: the driver (this process) is the only reader of the input and the only writer of the output. It
streams rows, keeps each EngineReplica actor fed with up to --max-in-flight rows (more than max_num_seqs, so the
engine's waiting queue refills continuous batching the moment a row finishes), and appends each finished row as
one complete JSON line with a single write(2) (fsync every few seconds). A replica runs its engine in a
background thread that never waits for the driver; the driver's one outstanding `poll(new_rows)` call per replica
hands new rows in and finished rows out. A crash loses at most the rows in flight; a torn last line (a write cut
by a machine crash) is cut off at the next start.
"""

from __future__ import annotations

import sys

from deployments.batch.cli import build_parser, default_sampling_params, engine_settings, job_options, main
from deployments.batch.driver import BatchJob, JobOptions
from deployments.batch.replica import EngineReplica
from deployments.batch.rows import INVALID, ResultWriter, RowParser, Task, error_row, id_key

__all__ = ["BatchJob", "EngineReplica", "INVALID", "JobOptions", "ResultWriter", "RowParser", "Task",
           "build_parser", "default_sampling_params", "engine_settings", "error_row", "id_key", "job_options", "main"]

if __name__ == "__main__":
    sys.exit(main())
