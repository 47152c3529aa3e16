"""The batch job (deployments/batch_job.py): row checks and the output file without Ray; then, on a local Ray head
with the dashboard, `ray job submit` on 60+ rows of the tiny model gives every row the offline engine's greedy
output and every bad row its error; a driver killed mid-job is rerun and finishes the rest, each id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serve_harness import VENV_BIN, ray_head, wait_for

from deployments.batch_job import INVALID, ResultWriter, RowParser, Task, build_parser, engine_settings, id_key
from nanovllm_ray import LLM, SamplingParams
from nanovllm_ray.config import Config

ROOT = Path(__file__).resolve().parent.parent
ENGINE = dict(max_model_len=256, max_num_seqs=16, kv_cache_memory_gb=0.05)
ENGINE_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "16", "--kv-cache-memory-gb", "0.05"]
DEFAULTS = {"temperature": 0.0, "max_tokens": 8}  # what --temperature 0 --max-tokens 8 give every row


# ---- rows and the output file, no Ray --------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"id": 1}, "neither 'prompt'"),
    ({"id": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both 'prompt' and 'messages'"),
    ({"id": 1, "prompt": ""}, "prompt is empty"),
    ({"id": 1, "prompt": []}, "non-empty list of token ids"),
    ({"id": 1, "prompt": [1, "2"]}, "non-empty list of token ids"),
    ({"id": 1, "prompt": "a", "sampling_params": {"temperature": -1}}, "temperature=-1.0 must be >= 0"),
    ({"id": 1, "prompt": "a", "sampling_params": {"max_tokens": 0}}, "max_tokens=0 must be >= 1"),
    ({"id": 1, "prompt": "a", "sampling_params": {"max_tokens": 2.5}}, "sampling_params.max_tokens"),
    ({"id": 1, "prompt": "a", "sampling_params": {"top_p": 0}}, "top_p=0.0 must be in (0, 1]"),
    ({"id": 1, "prompt": "a", "sampling_params": {"temp": 1}}, "unknown sampling parameters ['temp']"),
    ({"id": 1, "prompt": "a", "sampling_params": [1]}, "sampling_params must be an object"),
    ({"id": 1, "messages": []}, "messages must be a non-empty list"),
    ({"id": 1, "messages": [{"role": "god", "content": "x"}]}, "messages.0.role"),
    ({"id": 1, "prompt": "a", "sampling_params": {"top_k": 10**20}}, "top_k=100000000000000000000 must be"),
    ({"id": 1, "prompt": "a", "sampling_params": {"seed": 2**70}}, "seed=1180591620717411303424 must be"),
    ({"id": 1, "prompt": "a", "temperature": 0.5, "max_tokens": 3},
     'sampling parameters go under "sampling_params": [\'max_tokens\', \'temperature\']'),
])
def test_bad_rows_get_an_error_row(row, message):
    out = RowParser(DEFAULTS).parse(json.dumps(row), 3)
    assert isinstance(out, dict) and out["id"] == 1 and out["error"]["type"] == INVALID
    assert message in out["error"]["message"]


def test_rows_parse_into_tasks():
    parser = RowParser(DEFAULTS, chat_template_kwargs={"enable_thinking": False})
    task = parser.parse(json.dumps({"id": "a", "prompt": "hi", "sampling_params": {"max_tokens": 3, "stop": "x"}}), 1)
    assert isinstance(task, Task) and task.key == '"a"' and task.prompt == "hi"
    assert (task.params.temperature, task.params.max_tokens, task.params.stop) == (0.0, 3, ["x"])
    chat = parser.parse(json.dumps({"id": 2, "messages": [{"role": "user", "content": "hi"}]}), 2)
    assert chat.chat.chat_template_kwargs == {"enable_thinking": False} and chat.params.max_tokens == 8
    assert parser.parse(json.dumps({"prompt": [1, 2]}), 7).id == "line-7"  # no id: its line number
    assert parser.parse("{not json", 9) == {"id": "line-9", "error": {
        "message": "line 9 is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
                   "(char 1)", "type": INVALID}}
    with pytest.raises(ValueError, match="temperature"):
        RowParser({"temperature": -2})  # bad defaults fail at start, not on every row


def test_writer_cuts_a_torn_line_and_locks_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": "b", "error": {}}\n{"id": 3, "te')
    w = ResultWriter(str(path))
    assert w.done_keys == {id_key(1), id_key("b")} and w.torn_bytes == len('{"id": 3, "te')
    with pytest.raises(RuntimeError, match="locked"):
        ResultWriter(str(path))
    w.write([{"id": 3, "text": "line\nbreak"}, {"id": 4, "text": "é"}])
    w.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, "b", 3, 4] and rows[2]["text"] == "line\nbreak"
    assert ResultWriter(str(path)).torn_bytes == 0


def test_flags():
    """Every engine setting has a flag made from nanovllm_ray.Config (only those given are passed on)."""
    args = build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--tensor-parallel-size", "2",
                                      "--max-num-seqs", "8", "--no-enable-prefix-caching", "--enable-kv-cache-events",
                                      "--dispatch", "remote", "--gpu-memory-utilization", "0.5"])
    assert engine_settings(args) == {"tensor_parallel_size": 2, "max_num_seqs": 8, "enable_prefix_caching": False,
                                     "enable_kv_cache_events": True, "dispatch": "remote",
                                     "gpu_memory_utilization": 0.5}
    assert engine_settings(build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"])) == {}
    flags = build_parser().format_help()
    for name, *_ in Config.settings():
        assert "--" + name.replace("_", "-") in flags, name


@pytest.fixture(scope="module")
def head():
    with ray_head() as h:
        yield h


@pytest.fixture(scope="module")
def offline(tiny_model):
    return LLM(tiny_model, **ENGINE)


def _text_rows(n: int, start: int = 0) -> list[dict]:
    words = "the quick brown fox jumps over a lazy dog while seven ravens watch".split()
    return [{"id": f"t{i}", "prompt": f"Row {i}: " + " ".join(words[(i * 3 + k) % len(words)]
                                                                for k in range(i % 9 + 1))}
            for i in range(start, start + n)]


def _job_rows() -> tuple[list[dict], list[dict | str]]:
    """Good rows (text, token ids, chat, per-row sampling parameters) and bad ones, as written to the input."""
    good = _text_rows(40)
    good += [{"id": 1000 + i, "prompt": [(i * 7919 + k * 104729) % 150000 for k in range(3 + i * 5)]} for i in range(8)]
    for i in range(6):
        chat = {"id": f"chat-{i}", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}
        if i % 3 == 0:
            chat["chat_template_kwargs"] = {"enable_thinking": False}
        good.append(chat)
    for row in good[:5]:
        row["sampling_params"] = {"max_tokens": 12, "ignore_eos": True}
    bad: list[dict | str] = [
        {"id": "no-prompt", "sampling_params": {"max_tokens": 4}},
        {"id": "too-long", "prompt": list(range(300))},  # max_model_len is 256
        {"id": "cold", "prompt": "x", "sampling_params": {"temperature": -1}},
        {"id": "unknown-key", "prompt": "x", "sampling_params": {"beam_width": 4}},
        {"id": "no-tokens", "prompt": "x", "sampling_params": {"max_tokens": 0}},
        {"id": "vocab", "prompt": [5, 10**7]},
        {"id": "no-messages", "messages": []},
        {"id": "surrogate", "prompt": "ab\ud800cd"},  # valid JSON that no tokenizer takes
        {"id": "huge-top-k", "prompt": "x", "sampling_params": {"top_k": 10**20}},  # past int64
        {"id": "top-level", "prompt": "x", "max_tokens": 4},  # a sampling key outside sampling_params
        "this line is not JSON",
    ]
    return good, bad


def _write_input(path: Path, rows: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _reference(llm: LLM, rows: list[dict]) -> dict[str, dict]:
    """The offline engine's output for each good row, keyed like the job's ids."""
    prompts, params = [], []
    for row in rows:
        if "messages" in row:
            prompts.append(llm.tokenizer.apply_chat_template(
                row["messages"], tokenize=False, add_generation_prompt=True, **row.get("chat_template_kwargs", {})))
        else:
            prompts.append(row["prompt"])
        params.append(SamplingParams(**{**DEFAULTS, **row.get("sampling_params", {})}))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {id_key(row["id"]): {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                                "prompt_tokens": o.num_prompt_tokens, "completion_tokens": o.num_generated_tokens}
            for row, o in zip(rows, outs)}


def _read_output(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "torn last line"
    return [json.loads(line) for line in text.splitlines()]


def _check_against(rows: list[dict], ref: dict[str, dict]) -> None:
    for row in rows:
        want = ref[id_key(row["id"])]
        got = {"text": row["text"], "token_ids": row["token_ids"], "finish_reason": row["finish_reason"],
               "prompt_tokens": row["usage"]["prompt_tokens"], "completion_tokens": row["usage"]["completion_tokens"]}
        assert got == want, f"row {row['id']}"
        assert row["usage"]["total_tokens"] == got["prompt_tokens"] + got["completion_tokens"]


def _job_cmd(model: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deployments.batch_job", "--model", model, "--input", str(inp), "--output", str(out),
            "--temperature", "0", "--max-tokens", "8", *ENGINE_FLAGS, *extra]


def test_ray_job_submit_matches_offline_engine(head, tiny_model, offline, tmp_path):
    good, bad = _job_rows()
    inp, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    _write_input(inp, good[:20] + bad[:4] + good[20:] + bad[4:])
    # The upload leaves out dot-directories (.venv, .git, caches), checkpoints and benchmark results.
    excludes = json.dumps({"excludes": [".*", "checkpoints", "benchmarks/results"]})
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(ROOT),
           "--runtime-env-json", excludes, "--",
           *_job_cmd(tiny_model, inp, out, "--replicas", "2", "--replica-num-cpus", "0.5", "--log-interval-s", "1",
                     "--summary", str(summary))]
    proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    print(log[-6000:])  # shown by pytest -s or on failure
    assert proc.returncode == 0, log[-5000:]
    assert "progress: " in log and "summary: rows 65 written this run (54 ok, 11 invalid)" in log, log[-5000:]

    rows = _read_output(out)
    assert sorted(id_key(r["id"]) for r in rows) == sorted(
        [id_key(r["id"]) for r in good + bad if isinstance(r, dict)] + [id_key("line-65")])
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert all(e["type"] == INVALID for e in errors.values())
    expected = {"no-prompt": "neither 'prompt'", "too-long": "prompt has 300 tokens; max_model_len is 256",
                "cold": "temperature=-1.0 must be >= 0", "unknown-key": "unknown sampling parameters ['beam_width']",
                "no-tokens": "max_tokens=0 must be >= 1", "vocab": "token id 10000000 is outside the vocabulary",
                "no-messages": "messages must be a non-empty list", "line-65": "line 65 is not valid JSON",
                "surrogate": "prompt cannot be tokenized", "huge-top-k": "top_k=100000000000000000000 must be",
                "top-level": "sampling parameters go under \"sampling_params\": ['max_tokens']"}
    assert set(errors) == set(expected)
    for rid, fragment in expected.items():
        assert fragment in errors[rid]["message"], errors[rid]
    _check_against([r for r in rows if "error" not in r], _reference(offline, good))

    s = json.loads(summary.read_text())
    assert (s["rows_total"], s["rows_ok"], s["rows_invalid"], s["rows_failed"], s["rows_not_run"]) == (65, 54, 11, 0, 0)
    assert s["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in rows if "error" not in r)
    assert s["completion_tokens_per_s"] > 0 and s["replicas"] == 2


def test_killed_job_resumes_without_duplicates(head, tiny_model, offline, tmp_path):
    rows = _text_rows(100, start=100)
    inp, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    _write_input(inp, rows)
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    # Slowed down (a pause after each engine step) so that the kill lands mid-job.
    first = subprocess.Popen(_job_cmd(tiny_model, inp, out, "--replicas", "2", "--replica-num-cpus", "0.5",
                                      "--max-num-seqs", "4", "--step-delay-s", "0.05", "--no-progress-bar"),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: first.poll() is not None or (out.exists() and out.read_text().count("\n") >= 12), 120, 0.05,
                 "a dozen rows written")
        assert first.poll() is None, first.stdout.read()[-3000:]
        first.send_signal(signal.SIGKILL)  # a crash: no handler runs
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    written = _read_output(out)
    assert 12 <= len(written) < 100
    with open(out, "a") as f:
        f.write('{"id": "t150", "text": "a write cut sh')  # what a machine crash mid-write would leave

    # The rerun: one replica with two tensor-parallel ranks (rank actors in the replica's placement group).
    rerun = subprocess.run(_job_cmd(tiny_model, inp, out, "--replicas", "1", "--tensor-parallel-size", "2",
                                    "--worker-num-cpus", "0.5", "--no-progress-bar", "--summary", str(summary)),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    final = _read_output(out)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 100 and set(ids) == {r["id"] for r in rows}
    assert final[:len(written)] == written  # the first run's rows are kept as they were
    _check_against(final, _reference(offline, rows))
    s = json.loads(summary.read_text())
    assert s["rows_skipped"] == len(written) and s["rows_written"] == 100 - len(written)
    assert s["torn_bytes_truncated"] == len('{"id": "t150", "text": "a write cut sh') and s["tensor_parallel_size"] == 2


def test_ray_job_stop_keeps_whole_rows(head, tiny_model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp, _text_rows(80, start=500))
    ray_cli, job_id = str(VENV_BIN / "ray"), f"batch-stop-{os.getpid()}"
    submit = [ray_cli, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id, "--no-wait",
              "--", *_job_cmd(tiny_model, inp, out, "--replicas", "2", "--replica-num-cpus", "0.5",
                              "--max-num-seqs", "4", "--step-delay-s", "0.05")]
    subprocess.run(submit, env=head.env, check=True, capture_output=True, timeout=60)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 8, 120, 0.1, "rows written")
    subprocess.run([ray_cli, "job", "stop", "--address", head.dashboard_url, job_id], env=head.env, check=True,
                   capture_output=True, timeout=60)  # SIGTERM to the driver, SIGKILL a few seconds later
    status = subprocess.run([ray_cli, "job", "status", "--address", head.dashboard_url, job_id], env=head.env,
                            capture_output=True, text=True, timeout=60)
    logs = subprocess.run([ray_cli, "job", "logs", "--address", head.dashboard_url, job_id], env=head.env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "was stopped" in status.stdout + status.stderr
    assert "SIGTERM: stopping" in logs and "stopped by SIGTERM" in logs, logs[-3000:]  # stopped in time, cleanly
    rows = _read_output(out)  # whole lines only
    assert 8 <= len(rows) < 80 and len({r["id"] for r in rows}) == len(rows)


def test_dead_replica_rows_run_again_elsewhere(head, tiny_model, offline, tmp_path):
    from ray.util.state import list_actors

    rows = _text_rows(60, start=300)
    inp, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    _write_input(inp, rows)
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    job = subprocess.Popen(_job_cmd(tiny_model, inp, out, "--replicas", "2", "--replica-num-cpus", "0.5",
                                    "--max-num-seqs", "4", "--step-delay-s", "0.05", "--no-progress-bar",
                                    "--summary", str(summary)),
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: job.poll() is not None or (out.exists() and out.read_text().count("\n") >= 8), 120, 0.05,
                 "rows written")
        replicas = [a for a in list_actors(address=head.dashboard_url, filters=[("class_name", "=", "EngineReplica"),
                                                                              ("state", "=", "ALIVE")])]
        assert job.poll() is None and len(replicas) == 2
        os.kill(replicas[0].pid, signal.SIGKILL)  # a replica's process dies with rows in flight
        log, _ = job.communicate(timeout=180)
        print(log[-6000:])  # shown by pytest -s or on failure
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-5000:]
    assert "replica 0 failed" in log or "replica 1 failed" in log, log[-5000:]
    final = _read_output(out)
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in rows)  # each exactly once
    _check_against(final, _reference(offline, rows))
    s = json.loads(summary.read_text())
    assert (s["replica_restarts"], s["rows_failed"], s["rows_ok"]) == (1, 0, 60)


def test_rerun_of_a_finished_job_starts_no_replica(tiny_model, offline, tmp_path):
    rows = _text_rows(3)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp, rows)
    ref = _reference(offline, rows)
    _write_input(out, [{"id": r["id"], "text": ref[id_key(r["id"])]["text"]} for r in rows])
    # No Ray address: the job would start a local Ray instance only if it had a row to run.
    proc = subprocess.run(_job_cmd(tiny_model, inp, out, "--address", "local", "--no-progress-bar"), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to run" in proc.stdout and "3 already written" in proc.stdout, proc.stdout
    assert len(_read_output(out)) == 3
