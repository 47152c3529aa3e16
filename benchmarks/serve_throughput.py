"""Served throughput: the nano-vllm workload over HTTP against the same engine offline, on the same card, in one run.

    python benchmarks/serve_throughput.py                          # qwen3-0.6b demo weights, 1 replica, 256 streams
    python benchmarks/serve_throughput.py --concurrency 1,32,256   # a closed loop of c requests at a time, each c
    python benchmarks/serve_throughput.py --replicas 2             # N replicas, one GPU each
    python benchmarks/serve_throughput.py --variants stream,no-stream,chat   (or --no-stream / --chat)
    python benchmarks/serve_throughput.py --smoke                  # CPU: the tiny model, a small workload

Workload (benchmarks/throughput.py's, nano-vllm's): 256 prompts of 100-1024 random token ids, max_tokens 100-1024,
temperature 0.6, ignore_eos. At concurrency c below the workload's size, the first max(2c, 24) requests run.

Offline: a subprocess drives LLMEngine.step() in a closed loop of c requests (at c = all, exactly LLM.generate:
every request added at once), with the app's engine settings; it reports tok/s, TTFT, TPOT, the gap between a
request's tokens, and the engine's decode step at that batch. Served: `serve run` of a YAML like serve_config.yaml,
written for the run (the same code path), then the same requests as streaming /v1/completions from several client
processes (benchmarks/http_client.py; all started before any sends, so that neither their start-up nor their CPU is
measured). Per request: TTFT (send to first token), TPOT ((last chunk - first chunk) / (tokens - 1)), the gap
between chunks, and the gap per token (a chunk of k tokens g after the previous one: g/k for each of its k tokens;
its p50 is near 0 when chunks arrive in bursts, so read TPOT beside it). Requests per replica come from each
LLMServer replica's counters; each replica's engine timeline (steps with prefill, decode steps, time outside any
step) from its engine core; at concurrency 1, TTFT is split into admission, engine and delivery.

--http haproxy (the default) or proxy: who takes HTTP, Ray Serve's HAProxy ingress as deployments.launch sets it
up, or Serve's Python proxy actor. --py-spy S samples the Serve processes (proxy, ingress, LLMServer, engine core)
for S seconds during the largest streaming run and writes each one's costliest functions to results/ (py-spy must
be on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    demo_checkpoint,
    device_name,
    per_replica,
    percentile,
    print_table,
    save_figure,
    write_result,
)
from benchmarks.throughput import unseen, workload
from deployments.launch import HAPROXY_ENV, serve_environment
from nanovllm_ray import stages

ROOT = Path(__file__).resolve().parent.parent


def subset(n_all: int, c: int) -> int:
    """Requests run at concurrency c: all of them at full concurrency, else enough for a steady state."""
    return n_all if c >= n_all else min(n_all, max(2 * c, 24))


def timed_prompts(prompts: list[list[int]], run: int) -> list[list[int]]:
    """The prompts of this process's run-th timed run (0: as drawn), none of whose blocks an earlier run or the
    warm-up (unseen(.., 1)) left in the prefix cache: each level reruns the workload's first requests."""
    return prompts if run == 0 else unseen(prompts, run + 1)


# ---- the engine alone (a subprocess: it must give the GPU back before the service starts) --------------------


def offline(args, path: str, engine_kwargs: dict, levels: list[int]) -> dict[int, dict]:
    import torch

    from nanovllm_ray import LLMEngine, SamplingParams
    from nanovllm_ray.config import Config

    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    engine = LLMEngine(Config.from_kwargs(path, **engine_kwargs))
    warm = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4, detokenize=False)
    for i, p in enumerate(unseen(prompts[:8], 1)):
        engine.add_request(f"warm-{i}", p, warm)
    while engine.has_unfinished_requests():
        engine.step()
    out = {}
    for run, c in enumerate(levels):
        n = subset(len(prompts), c)
        run_prompts = timed_prompts(prompts, run)
        engine.scheduler.max_num_seqs = min(c, engine_kwargs["max_num_seqs"])
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m, detokenize=False)
                  for m in max_tokens[:n]]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sent: dict[str, float] = {}
        first: dict[str, float] = {}
        prev: dict[str, float] = {}  # each request's last output
        last: dict[str, float] = {}  # its finish
        gaps: list[float] = []  # per token after the first: time since the request's previous output / tokens
        steps: list[tuple[float, float, int, int]] = []  # (start, end, sequences, tokens) of each step
        nxt = 0
        hits_before = engine.stats().prefix_cache_hits
        t0 = time.monotonic()
        while nxt < n or engine.has_unfinished_requests():
            while nxt < n and len(sent) - len(last) < c:
                rid = f"r{c}-{nxt}"
                engine.add_request(rid, run_prompts[nxt], params[nxt])
                sent[rid] = time.monotonic()
                nxt += 1
            t = time.monotonic()
            outs = engine.step()
            now = time.monotonic()
            steps.append((t, now, *engine.last_batch))
            for o in outs:
                rid, k = o.request_id, len(o.new_token_ids)
                if rid not in first:
                    first[rid], k = now, k - 1
                if k > 0:
                    gaps += [(now - prev[rid]) / k] * k
                prev[rid] = now
                if o.finished:
                    last[rid] = now
        wall = time.monotonic() - t0
        tokens = sum(max_tokens[:n])
        full = [e - t for t, e, seqs, k in steps if k == seqs and seqs >= 0.9 * min(c, n)]
        out[c] = {"requests": n, "output_tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
                  "ttft_p50_ms": 1e3 * percentile([first[r] - sent[r] for r in sent], 0.5),
                  "ttft_p99_ms": 1e3 * percentile([first[r] - sent[r] for r in sent], 0.99),
                  "gap_p50_ms": 1e3 * percentile(gaps, 0.5), "gap_p99_ms": 1e3 * percentile(gaps, 0.99),
                  "tpot_p50_ms": 1e3 * percentile([(last[r] - first[r]) / max(1, m - 1)
                                            for r, m in zip(sent, max_tokens[:n])], 0.5),
                  "step_ms_at_batch": 1e3 * statistics.median(full) if full else float("nan"),
                  "prefix_cache_hit_tokens": engine.stats().prefix_cache_hits - hits_before,
                  "engine": engine_summary(steps, wall)}
        e = out[c]["engine"]
        print(f"[offline c={c}] {tokens} tokens in {wall:.2f} s: {tokens / wall:,.0f} tok/s; {e['prefill_steps']} "
              f"prefill steps ({e['prefill_s']:.2f} s), {e['decode_steps']} decode steps ({e['decode_s']:.2f} s, "
              f"batch {e['decode_batch_mean']:.0f}); prompt tokens found cached {out[c]['prefix_cache_hit_tokens']}",
              flush=True)
    engine.shutdown()
    return out


def run_offline_subprocess(args, path: str, engine_kwargs: dict, levels: list[int]) -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"args": vars(args), "path": path, "engine_kwargs": engine_kwargs,
                                    "levels": levels, "out": str(Path(tmp) / "out.json")}))
        subprocess.run([sys.executable, __file__, "--offline-spec", str(spec)], check=True)
        return {int(k): v for k, v in json.loads((Path(tmp) / "out.json").read_text()).items()}


# ---- the client: several processes, each a closed loop of its share of the concurrency ---------------------


def request_body(kind: str, model: str, prompt: list[int] | str, max_tokens: int) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.6, "ignore_eos": True}
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
        body["return_token_ids"] = True  # tokens per chunk
    if not kind.endswith("no-stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def served(url: str, bodies: list[dict], c: int, procs: int) -> list[dict]:
    """Run the requests from `procs` client processes (benchmarks/http_client.py) at `c` at once in all; every
    process is up and connected-ready before any sends (no stagger of process start-up in the measurement)."""
    procs = max(1, min(procs, c, len(bodies)))
    per = [c // procs + (1 if i < c % procs else 0) for i in range(procs)]
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for i in range(procs):
            spec = Path(tmp) / f"spec-{i}.json"
            spec.write_text(json.dumps({"url": url, "bodies": bodies[i::procs], "concurrency": per[i],
                                        "out": str(Path(tmp) / f"out-{i}.json")}))
            children.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_client.py")),
                                              str(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in children:
            assert p.stdout.readline().strip() == "ready"
        for p in children:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in children:
            if p.wait() != 0:
                raise RuntimeError("a client process failed")
        return [r for i in range(procs) for r in json.loads((Path(tmp) / f"out-{i}.json").read_text())]


def summarize(results: list[dict]) -> dict:
    start = min(r["sent"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["sent"] for r in results if r["first"] is not None]
    chunk_gaps, token_gaps, per_chunk, tpot = [], [], [], []
    for r in results:
        ch = r["chunks"]
        for (t0, _), (t1, k) in zip(ch, ch[1:]):
            chunk_gaps.append(t1 - t0)
            if k > 0:
                token_gaps += [(t1 - t0) / k] * k
        per_chunk += [k for _, k in ch if k > 0]
        if len(ch) > 1 and r["tokens"] > 1:
            tpot.append((ch[-1][0] - ch[0][0]) / (r["tokens"] - 1))
    return {"requests": len(results), "output_tokens": tokens, "seconds": end - start, "tok_s": tokens / (end - start),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "gap_p50_ms": 1e3 * percentile(token_gaps, 0.5), "gap_p99_ms": 1e3 * percentile(token_gaps, 0.99),
            "chunk_gap_p50_ms": 1e3 * percentile(chunk_gaps, 0.5),
            "chunk_gap_p99_ms": 1e3 * percentile(chunk_gaps, 0.99),
            "tokens_per_chunk": statistics.fmean(per_chunk) if per_chunk else float("nan"),
            "tpot_p50_ms": 1e3 * percentile(tpot, 0.5)}


# ---- the service ---------------------------------------------------------------------------------------------


def _delta(after: dict[str, dict], before: dict[str, dict], key: str) -> dict[str, int]:
    return {r: a[key] - before.get(r, {}).get(key, 0) for r, a in after.items()}


def engine_summary(steps: list, wall: float) -> dict:
    """Where an engine loop's time went over `wall` seconds: steps with prefill work, decode-only steps, and the
    time outside any step (waiting for work, or the loop's own commands and reports)."""
    prefill = [(e - t, n, k) for t, e, n, k, *_ in steps if k > n]
    decode = [(e - t, n) for t, e, n, k, *_ in steps if k <= n]
    busy = sum(d for d, *_ in prefill) + sum(d for d, _ in decode)
    return {"steps": len(steps), "prefill_steps": len(prefill), "prefill_s": sum(d for d, *_ in prefill),
            "prefill_tokens_per_step": statistics.fmean(k for *_, k in prefill) if prefill else 0.0,
            "decode_steps": len(decode), "decode_s": sum(d for d, _ in decode),
            "decode_batch_mean": statistics.fmean(n for _, n in decode) if decode else 0.0,
            "decode_step_ms_p50": 1e3 * percentile([d for d, _ in decode], 0.5),
            "outside_steps_s": max(0.0, wall - busy), "wall_s": wall}


# A first token's way at concurrency 1, stage to stage (nanovllm_ray/stages.py stamps them in each process): "sent"
# and "first" are the client's, "step" the start of the engine's prefill step. On the ingress's fast path the add
# goes from the ingress to the engine core and the LLMServer's call (server_in; no server_add) runs beside it.
STAGE_NAMES = {"sent": "client sends", "ingress_in": "ingress has it", "ingress_call": "ingress sends",
               "server_in": "LLMServer has it", "server_add": "LLMServer sends the add",
               "core_add": "engine loop has it", "step": "prefill step starts",
               "core_first": "first token leaves the core", "ingress_first": "ingress run has it",
               "ingress_sse": "first SSE event", "first": "client has it"}
ORDINARY = ("sent", "ingress_in", "ingress_call", "server_in", "server_add", "core_add", "step", "core_first",
            "ingress_first", "ingress_sse", "first")
FAST = tuple(st for st in ORDINARY if st not in ("server_in", "server_add"))


def ttft_breakdown(results: list[dict], steps: list, stamped: dict[str, dict[str, float]] | None = None) -> dict:
    """For requests that found the engine idle (concurrency 1): client send -> the engine's prefill step starts
    (admission: HTTP, proxy, ingress, LLMServer, engine core), -> the step after it ends (the engine: with async
    scheduling a step's tokens come out during the next one), -> the first chunk at the client (delivery). With
    the processes' stage stamps, each request's way stage by stage (ORDINARY, or FAST), medians in ms."""
    parts: list[tuple[float, float, float]] = []
    ways: list[list[float]] = []
    starts = [st[0] for st in steps]
    arrivals = sorted((t, rid) for rid, t in (stamped or {}).get("ingress_in", {}).items())
    for r in results:
        if r["first"] is None:
            continue
        i = next((k for k, t in enumerate(starts) if t >= r["sent"]), None)
        if i is None or i + 1 >= len(steps) or steps[i][3] <= steps[i][2]:
            continue  # no prefill step of its own
        parts.append((steps[i][0] - r["sent"], steps[i + 1][1] - steps[i][0], r["first"] - steps[i + 1][1]))
        rid = next((rid for t, rid in arrivals if r["sent"] <= t <= r["end"]), None)  # one request at a time
        at = {"sent": r["sent"], "first": r["first"], "step": steps[i][0],
              **{stage: stamped[stage].get(rid) for stage in stamped}} if rid else {}
        chain = ORDINARY if at.get("server_add") is not None else FAST
        if all(at.get(st) is not None for st in chain):
            ways.append({f"{STAGE_NAMES[a]} -> {STAGE_NAMES[b]}": at[b] - at[a] for a, b in zip(chain, chain[1:])})
    if not parts:
        return {}
    out = {k: 1e3 * statistics.median(p[j] for p in parts)
           for j, k in enumerate(("admission_ms", "engine_ms", "delivery_ms"))}
    if ways:
        out["stages_ms"] = {k: 1e3 * statistics.median(w[k] for w in ways if k in w)
                            for k in dict.fromkeys(k for w in ways for k in w)}
        out["stages_requests"] = len(ways)
        fast = f"{STAGE_NAMES['ingress_call']} -> {STAGE_NAMES['core_add']}"
        out["fast_path_requests"] = sum(fast in w for w in ways)
    return out


def start_service(args, app_args: dict, port: int, address: str) -> tuple[subprocess.Popen, float]:
    import httpx
    import yaml

    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "bench", "route_prefix": "/", "import_path": "deployments.app:build_app",
                                "args": app_args}]}
    cfg = Path(tempfile.mkdtemp()) / "serve_bench.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.app_dir), os.environ.get("PYTHONPATH", "")])}
    t = time.monotonic()
    # `serve run` itself: the CLI's entry point (the wheel's `serve` script may carry another machine's shebang)
    proc = subprocess.Popen([sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", "--address",
                             address, "--non-blocking", str(cfg)], cwd=args.app_dir, env=env)
    deadline = t + args.startup_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                return proc, time.monotonic() - t
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service did not answer /v1/models within {args.startup_timeout_s} s")


def wait_for_replicas(app: str, n: int, timeout_s: float) -> None:
    """Until all n LLMServer replicas run (/v1/models answers as soon as an ingress replica does)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    states: dict = {}
    while time.monotonic() < deadline:
        states = dict(serve.status().applications[app].deployments["LLMServer"].replica_states)
        if states.get("RUNNING", 0) >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"LLMServer replicas of {app}: {states}, not {n} running, after {timeout_s:.0f} s")


def profile_serve_processes(seconds: float, tag: str) -> Path | None:
    """py-spy each Serve process for `seconds`; one text file of each one's costliest functions."""
    if shutil.which("py-spy") is None:
        print("py-spy not found: no profile")
        return None
    names = {"ProxyActor": "proxy", "OpenAIIngress": "ingress", "LLMServer": "llm_server",
             "EngineCoreActor": "engine_core"}
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    targets = []
    for line in ps:
        pid, _, cmd = line.strip().partition(" ")
        for key, name in names.items():
            if key in cmd and cmd.startswith("ray::"):
                targets.append((name, int(pid)))
    tmp = Path(tempfile.mkdtemp())
    procs = [(name, pid, subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                                           "-f", "raw", "-o", str(tmp / f"{name}-{pid}.txt"), "--gil"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
             for name, pid in targets]
    lines = []
    for name, pid, p in procs:
        p.wait()
        f = tmp / f"{name}-{pid}.txt"
        if not f.exists():
            lines.append(f"== {name} (pid {pid}): no samples")
            continue
        own, incl, total = Counter(), Counter(), 0
        for row in f.read_text().splitlines():
            stack, _, n = row.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] += int(n)
            for fr in set(frames):
                incl[fr] += int(n)
        lines.append(f"== {name} (pid {pid}): {total} samples in {seconds:.0f} s "
                     f"({total / (200 * seconds):.2f} of the time holding the GIL, at 200 Hz)")
        lines += ["  self  " + f"{100 * v / total:5.1f}% {k}" for k, v in own.most_common(15)]
        lines += ["  incl  " + f"{100 * v / total:5.1f}% {k}" for k, v in incl.most_common(25)]
    out = RESULTS / f"serve_profile{'-' + tag if tag else ''}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    out.write_text("\n".join(lines) + "\n")
    print("wrote", out)
    return out


def profile_in_background(seconds: float, tag: str):
    """Start profiling one second from now (the load is up by then); join the thread, then read holder["path"]."""
    import threading

    holder: dict[str, Path | None] = {}

    def run() -> None:
        time.sleep(1.0)
        holder["path"] = profile_serve_processes(seconds, tag)

    th = threading.Thread(target=run)
    th.start()
    return th, holder


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (python benchmarks/serve_throughput.py --plot JSON makes it)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    stream = [r for r in rows if r["variant"] == "stream"]
    cs = [r["concurrency"] for r in stream]
    ax.plot(cs, [r["offline_tok_s"] for r in stream], "o-", label="offline engine (LLMEngine.step loop)")
    ax.plot(cs, [r["served_tok_s"] for r in stream], "s-", label="served (HTTP streaming, serve run)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(rows[0].get("title", "served vs offline"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# ---- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the --shape demo checkpoint)")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, 16 requests, short lengths")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--concurrency", default=None, help="comma list (default: all requests at once)")
    ap.add_argument("--variants", default="stream", help="comma list of stream, no-stream, chat, chat-no-stream; "
                                                          "the extra ones run at the largest concurrency")
    ap.add_argument("--no-stream", action="store_true", help="the same as --variants no-stream")
    ap.add_argument("--chat", action="store_true", help="the same as --variants chat")
    ap.add_argument("--replicas", type=int, default=1, help="LLMServer replicas (one GPU each)")
    ap.add_argument("--app-arg", action="append", default=[], metavar="KEY=JSON", help="another app arg")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--client-procs", type=int, default=0, help="client processes (default: one per 32 streams)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--app-dir", default=str(ROOT), help="where the app's code is imported from (a before-run)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--http", choices=("haproxy", "proxy"), default="haproxy",
                    help="who takes HTTP: Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, as "
                         "deployments.launch sets it up: the ingress replicas serve HTTP behind HAProxy), or Serve's "
                         "Python proxy actor")
    ap.add_argument("--startup-timeout-s", type=float, default=900)
    ap.add_argument("--py-spy", type=float, default=0, metavar="S")
    ap.add_argument("--tag", default="")
    ap.add_argument("--offline-spec", help=argparse.SUPPRESS)
    ap.add_argument("--plot", metavar="JSON", help="only make the PNG of an earlier run's JSON")
    args = ap.parse_args()
    if args.plot:
        data = json.loads(Path(args.plot).read_text())
        plot(data["rows"], Path(args.plot).with_suffix(".png"))
        return
    if args.offline_spec:
        spec = json.loads(Path(args.offline_spec).read_text())
        ns = argparse.Namespace(**spec["args"])
        res = offline(ns, spec["path"], spec["engine_kwargs"], spec["levels"])
        Path(spec["out"]).write_text(json.dumps(res))
        return

    import torch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_gpu = torch.cuda.is_available()
    if args.smoke:  # smaller defaults; flags given explicitly win
        for key, value in (("shape", "tiny"), ("num_seqs", 16), ("max_input_len", 64), ("max_output_len", 16)):
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    variants = ["no-stream"] if args.no_stream else ["chat"] if args.chat else args.variants.split(",")
    path = str(Path(demo_checkpoint(args.shape, args.model)).resolve())
    levels = sorted({int(c) for c in (args.concurrency or str(args.num_seqs)).split(",")})
    engine_kwargs = dict(max_model_len=args.max_model_len, max_num_seqs=max(levels + [1]),
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization)
    if not on_gpu:
        engine_kwargs.update(kv_cache_memory_gb=1.0)
    name = "bench"
    prompts, max_tokens = workload(args.num_seqs, args.max_input_len, args.max_output_len)

    off = {} if args.skip_offline else run_offline_subprocess(args, path, engine_kwargs, levels)

    import ray
    from ray import serve

    # HTTP as deployments.launch sets it up (or Serve's proxy actor): read by the processes this ray.init starts;
    # and every process stamps a request's stages (a few lines a request) for the concurrency-1 breakdown
    stage_dir = tempfile.mkdtemp(prefix="nanovllm-stages-")
    os.environ[stages.ENV] = stage_dir
    os.environ.update(serve_environment({**os.environ, HAPROXY_ENV: "1" if args.http == "haproxy" else "0"}))
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    app_args = dict(model=path, served_model_name=name, num_replicas=args.replicas,
                    max_ongoing_requests=2 * max(levels + [1]), max_queued_requests=-1, **engine_kwargs)
    if not on_gpu:
        app_args["replica_num_cpus"] = 0
    for kv in args.app_arg:
        k, _, v = kv.partition("=")
        app_args[k] = json.loads(v)
    rows: list[dict] = []
    profile = None
    try:
        proc, startup_s = start_service(args, app_args, args.port, address)
        wait_for_replicas(name, args.replicas, args.startup_timeout_s)
        print(f"service up in {startup_s:.1f} s (serve run until /v1/models answers)", flush=True)
        url = f"http://127.0.0.1:{args.port}"
        tok = None
        if any(v.startswith("chat") for v in variants):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
        # warm-up: the Python paths of every process on the way, and the engine's for these shapes
        served(url + "/v1/completions", [request_body("stream", name, p, 4) for p in unseen(prompts[:8], 1)], 8, 1)
        runs = [(variant, c) for variant in variants for c in (levels if variant == variants[0] else levels[-1:])]
        for run, (variant, c) in enumerate(runs):
            n = subset(len(prompts), c)
            src = timed_prompts(prompts, run)[:n]
            if variant.startswith("chat"):
                src = [tok.decode(p) for p in src]
            bodies = [request_body(variant, name, src[i], max_tokens[i]) for i in range(n)]
            endpoint = "/v1/chat/completions" if variant.startswith("chat") else "/v1/completions"
            procs = args.client_procs or max(1, min(8, c // 32))
            before = per_replica(name, "stats")
            t_run = time.monotonic()
            if args.py_spy and variant == "stream" and c == levels[-1] and profile is None:
                th, holder = profile_in_background(args.py_spy, args.tag)
                res = served(url + endpoint, bodies, c, procs)
                th.join()
                profile = holder.get("path")
            else:
                res = served(url + endpoint, bodies, c, procs)
            s = summarize(res)
            time.sleep(0.5)  # a replica counts a request once its stream has closed
            after = per_replica(name, "stats")
            t0, t1 = min(r["sent"] for r in res), max(r["end"] for r in res)
            timelines = per_replica(name, "engine_timeline", t_run)
            engine = {r: engine_summary([st for st in v["steps"] if t0 <= st[0] <= t1], t1 - t0)
                      for r, v in timelines.items()}
            breakdown = ttft_breakdown(res, next(iter(timelines.values()))["steps"],
                                       stages.read(stage_dir)) if c == 1 else {}
            if breakdown:
                print(f"  TTFT at concurrency 1, medians: admission {breakdown['admission_ms']:.1f} ms, engine "
                      f"{breakdown['engine_ms']:.1f} ms, delivery {breakdown['delivery_ms']:.1f} ms", flush=True)
                for stage, ms in breakdown.get("stages_ms", {}).items():
                    print(f"    {stage:<55} {ms:7.2f} ms", flush=True)
            o = off.get(c, {})
            row = {"variant": variant, "concurrency": c, "requests": n, "served_tok_s": s["tok_s"],
                   "offline_tok_s": o.get("tok_s", float("nan")),
                   "ratio": s["tok_s"] / o["tok_s"] if o else float("nan"),
                   "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p99_ms": s["ttft_p99_ms"],
                   "gap_p50_ms": s["gap_p50_ms"], "gap_p99_ms": s["gap_p99_ms"],
                   "chunk_gap_p50_ms": s["chunk_gap_p50_ms"], "tokens_per_chunk": s["tokens_per_chunk"],
                   "tpot_p50_ms": s["tpot_p50_ms"],
                   "engine_ttft_p50_ms": o.get("ttft_p50_ms", float("nan")),
                   "engine_gap_p50_ms": o.get("gap_p50_ms", float("nan")),
                   "engine_tpot_p50_ms": o.get("tpot_p50_ms", float("nan")),
                   "engine_step_ms": o.get("step_ms_at_batch", float("nan")),
                   "requests_per_replica": sorted(_delta(after, before, "num_requests").values()),
                   "preemptions": sum(_delta(after, before, "num_preemptions").values()),
                   "prefix_cache_hit_tokens": sum(_delta(after, before, "prefix_cache_hits").values()),
                   "engine_prefix_cache_hit_tokens": o.get("prefix_cache_hit_tokens", float("nan")),
                   "kv_blocks": [after[r]["num_blocks"] for r in after],
                   "engine": engine, "ttft_breakdown": breakdown}
            for rep, e in engine.items():
                print(f"  engine {rep}: {e['prefill_steps']} prefill steps ({e['prefill_s']:.2f} s, "
                      f"{e['prefill_tokens_per_step']:.0f} tokens each), {e['decode_steps']} decode steps "
                      f"({e['decode_s']:.2f} s, batch {e['decode_batch_mean']:.0f}, p50 "
                      f"{e['decode_step_ms_p50']:.2f} ms), outside steps {e['outside_steps_s']:.2f} s of "
                      f"{e['wall_s']:.2f} s; preemptions {row['preemptions']}; prompt tokens found cached "
                      f"{row['prefix_cache_hit_tokens']}", flush=True)
            rows.append(row)
            print(f"[{variant} c={c}] served {s['tok_s']:,.0f} tok/s (offline {row['offline_tok_s']:,.0f}), "
                  f"TTFT p50 {s['ttft_p50_ms']:.1f} ms, gap p50 {s['gap_p50_ms']:.2f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    what = (f"{Path(path).name} on {device_name()}, {args.replicas} replica(s), {args.num_seqs} requests "
            f"({sum(max_tokens)} output tokens), HTTP through {args.http}")
    print(f"\n{what}; service up in {startup_s:.1f} s")
    print_table([{k: v for k, v in r.items() if k in (
        "variant", "concurrency", "served_tok_s", "offline_tok_s", "ratio", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
        "gap_p50_ms", "gap_p99_ms", "chunk_gap_p50_ms", "tokens_per_chunk", "engine_ttft_p50_ms",
        "engine_tpot_p50_ms", "engine_gap_p50_ms", "engine_step_ms", "requests_per_replica")} for r in rows])
    for r in rows:
        r["title"] = what
    data = {"benchmark": "serve_throughput", "device": device_name(), "model": path, "config": vars(args),
            "app_args": app_args, "engine_kwargs": engine_kwargs, "startup_s": startup_s,
            "offline": off, "rows": rows,
            "profile": str(profile) if profile else None}
    out = write_result("serve_throughput", data, args.tag)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
