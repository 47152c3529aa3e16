"""The batch job's command line (`python -m deployments.batch_job`): the engine's flags are made from
nanovllm_ray.Config's settings (one declaration and default each), the job's from JobOptions'."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from dataclasses import fields
from typing import Any

from deployments.batch.driver import BatchJob, JobOptions
from nanovllm_ray.config import Config, ConfigError

logger = logging.getLogger("nanovllm_ray.batch")

DESCRIPTION = ("Batch generation as a Ray job: JSONL rows in, JSONL results out, across N engine replicas at once "
               "(data parallel), each with its own tensor-parallel group. Rows: the README's 'Batch jobs: the row "
               "format'.")
EXAMPLE = """example:
  ray job submit --working-dir . -- python -m deployments.batch_job \\
      --model /models/Qwen3-8B --input /data/in.jsonl --output /data/out.jsonl --replicas 4 --tensor-parallel-size 2
A rerun of the same command skips every id already in the output: a stopped or crashed job resumes."""
_OPTION_HELP = {
    "replicas": "engine replicas at once (data parallel)",
    "replica_num_cpus": "CPUs of a one-rank replica",
    "max_in_flight": "rows handed to a replica at once (default: 2 x max_num_seqs); a crash loses these",
    "max_row_attempts": "replicas a row may fail on before it is counted failed (not written; a rerun retries)",
    "max_replica_restarts": "replacements for replicas that die",
    "startup_timeout_s": "give up if no replica is ready by then (e.g. the cluster never gets the GPUs)",
    "log_interval_s": "seconds between progress lines",
    "fsync_interval_s": "seconds between fsyncs of the output",
    "address": "Ray address (default: RAY_ADDRESS, the running cluster, or a new local one; 'local' for a new one)",
    "summary": "write the closing summary as JSON here",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(typ: Any) -> Any:
    """int for `int | None`, and so on."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if args else typ


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.batch_job", description=DESCRIPTION, epilog=EXAMPLE,
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data")
    io.add_argument("--model", required=True, help="Hugging Face Qwen3 directory, present on every replica's node")
    io.add_argument("--input", required=True, help="JSONL rows (absolute path under `ray job submit`)")
    io.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")

    eng = p.add_argument_group("engine (nanovllm_ray.Config; unset: the engine's default)")
    for name, typ, default, help_ in Config.settings():
        if _scalar(typ) is bool:
            eng.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None,
                             help=f"{help_} (default: {default})")
        else:
            eng.add_argument(_flag(name), type=_scalar(typ), default=None, help=f"{help_} (default: {default})")

    sp = p.add_argument_group("default sampling parameters (a row's sampling_params override them)")
    sp.add_argument("--temperature", type=float, default=None, help="0 is greedy (SamplingParams' default: 1.0)")
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--max-tokens", type=int, default=None, help="SamplingParams' default: 16")
    sp.add_argument("--sampling-params", default=None, help='JSON object, e.g. \'{"top_k": 20, "stop": ["\\n"]}\'')
    sp.add_argument("--chat-template-kwargs", default=None, help='JSON object, e.g. \'{"enable_thinking": false}\'')

    run = p.add_argument_group("running (deployments.batch.driver.JobOptions)")
    for f in fields(JobOptions):
        if f.name == "progress_bar":
            run.add_argument("--no-progress-bar", action="store_true", help="only the progress lines")
        elif f.name == "step_delay_s":
            run.add_argument(_flag(f.name), type=float, default=f.default, help=argparse.SUPPRESS)  # tests
        else:
            typ = _scalar(typing.get_type_hints(JobOptions)[f.name])
            run.add_argument(_flag(f.name), type=typ, default=f.default,
                             help=f"{_OPTION_HELP[f.name]} (default: {f.default})")
    return p


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line (the rest keep Config's defaults)."""
    return {name: getattr(args, name) for name, *_ in Config.settings() if getattr(args, name) is not None}


def job_options(args: argparse.Namespace) -> JobOptions:
    values = {f.name: getattr(args, f.name) for f in fields(JobOptions) if f.name != "progress_bar"}
    return JobOptions(**values, progress_bar=not args.no_progress_bar)


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [batch] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    args = build_parser().parse_args(argv)
    try:
        job = BatchJob(args.model, args.input, args.output, engine_settings(args), default_sampling_params(args),
                       _json_arg(args.chat_template_kwargs, "chat-template-kwargs"), job_options(args))
    except (ConfigError, ValueError, RuntimeError, OSError) as e:  # a bad flag, an unreadable or locked file
        logger.error("%s", e)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = job.run()
    if job.stop_signal is not None:
        return 128 + job.stop_signal
    return 1 if summary.rows_failed or summary.rows_not_run else 0
