"""Prefix-aware routing against Ray Serve's default (power of two choices) on a few LLMServer replicas, through the
OpenAI HTTP API: global cached-token rate, time to first token, throughput, and how evenly the replicas are loaded.

    python benchmarks/routing.py                                   # tiny demo model, 2 replicas on the CPU
    python benchmarks/routing.py --replicas 3 --users 36

The workload: --users users, each a --turns-turn conversation over one of --system-prompts shared system prompts
(users start --stagger-s apart; each sends its next turn --think-s on average after the last one is answered; a
turn's prompt is the conversation so far plus a new user message, as token ids). Both routings serve the same
conversations on the same replicas with the same KV cache. Two references, computed on the same conversations:
  max_rate        the block-aligned maximum (unlimited memory, every earlier block reusable)
  single_replica  one engine in this process with the replicas' KV blocks summed, driven by the same users
                  (started one engine step apart, each next turn once the last one finished)
Per-replica load: requests served and prompt tokens computed (not cached), from each replica's engine counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from random import Random
from typing import Any

from benchmarks.common import (
    demo_checkpoint,
    device_name,
    per_replica,
    percentile,
    print_table,
    write_result,
)
from benchmarks.http_client import stream_completion
from benchmarks.prefix_cache import Chat, ReuseBound, make_chats, random_ids


def workload(args) -> list[Chat]:
    rng = Random(args.seed)
    systems = [random_ids(rng, args.system_len) for _ in range(args.system_prompts)]
    return make_chats(rng, args.users, args.turns, systems, args.message_len)


# ---- through the service -------------------------------------------------------------------------------------


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first = None
    ids: list[int] = []
    usage = None
    async for now, chunk in stream_completion(client, url, body):
        if chunk["choices"]:
            first = first or now
            ids += chunk["choices"][0].get("token_ids") or []
        if chunk.get("usage"):
            usage = chunk["usage"]
    assert first is not None and usage is not None and len(ids) == max_tokens, (usage, len(ids))
    return {"ttft": first - start, "e2e": time.monotonic() - start, "ids": ids,
            "prompt_tokens": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def run_users(url: str, chats: list[Chat], max_tokens: int, stagger_s: float, think_s: float,
                    block_size: int, seed: int) -> dict:
    import httpx

    bound = ReuseBound(block_size)
    results: list[dict] = []

    async def user(u: int, chat: Chat, client) -> None:
        think = Random(seed * 1000 + u)  # the same pauses under every routing
        await asyncio.sleep(u * stagger_s)
        while not chat.done():
            if chat.turn:
                await asyncio.sleep(think.uniform(0.5, 1.5) * think_s)
            p = chat.prompt()
            b = bound.reusable(p)
            bound.add(p)
            res = await one_request(client, url, p, max_tokens)
            bound.add(p + res["ids"][:-1])
            chat.reply(res["ids"])
            results.append({**res, "bound": b, "user": u})

    limits = httpx.Limits(max_connections=len(chats) + 8, max_keepalive_connections=len(chats) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(user(u, c, client) for u, c in enumerate(chats)))
        wall = time.perf_counter() - start
    return {"results": results, "wall": wall}


def serve_run(args, path: str, routing: str, port: int, run_index: int) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.router_actor import ROUTER_NAMESPACE, router_actor_name

    app = f"bench-{routing}-{run_index}"
    app_args = dict(model=path, served_model_name="bench", num_replicas=args.replicas, routing=routing,
                    tensor_parallel_size=args.tensor_parallel_size, replica_num_cpus=0, max_model_len=8192,
                    num_kvcache_blocks=args.kv_blocks, block_size=args.block_size, max_num_seqs=64,
                    max_num_batched_tokens=4096, max_ongoing_requests=128, max_queued_requests=-1,
                    prefix_routing=json.loads(args.prefix_routing))
    t = time.perf_counter()
    serve.run(build_app(app_args), name=app, route_prefix="/", blocking=False)
    while serve.status().applications[app].status != "RUNNING":
        time.sleep(0.5)
    print(f"[{routing}] {args.replicas} replicas up in {time.perf_counter() - t:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1/completions"
    # warm-up, not counted: full-size random prompts, a few per replica (first calls pay one-off costs)
    rng = Random(1000)
    warm = [random_ids(rng, args.system_len + args.message_len) for _ in range(3 * args.replicas)]

    async def warm_up() -> None:
        import httpx

        async with httpx.AsyncClient(timeout=600) as client:
            for i in range(0, len(warm), args.replicas):
                await asyncio.gather(*(one_request(client, url, p, 2) for p in warm[i:i + args.replicas]))

    asyncio.run(warm_up())
    before = per_replica(app, "stats")
    run = asyncio.run(run_users(url, workload(args), args.max_tokens, args.stagger_s, args.think_s,
                                args.block_size, args.seed))
    time.sleep(1.5)  # let the replicas' counters and the router's stats catch up
    after = per_replica(app, "stats")
    decisions = None
    if routing == "prefix_aware":
        actor = ray.get_actor(router_actor_name(app), namespace=ROUTER_NAMESPACE)
        stats = ray.get(actor.stats.remote())
        decisions = max(stats["routers"].values(), key=lambda s: s["num_decisions"])  # the ingress's router
        decisions.update(actor_cpu_s=stats["actor_cpu_s"], actor_reports=stats["num_reports"])
    serve.delete(app)
    if routing == "prefix_aware":
        ray.kill(actor)
    loads = {r: {"requests": after[r]["num_requests"] - before.get(r, {}).get("num_requests", 0),
                 "computed_tokens": (after[r]["prefix_cache_queries"] - after[r]["prefix_cache_hits"])
                 - (before.get(r, {}).get("prefix_cache_queries", 0) - before.get(r, {}).get("prefix_cache_hits", 0))}
             for r in after}
    return {**run, "per_replica": loads, "decisions": decisions}


def summarize(name: str, runs: list[dict]) -> dict:
    """Requests pooled over the runs; load spread: the worst run's max over mean."""
    res = [r for run in runs for r in run["results"]]
    wall = sum(run["wall"] for run in runs)
    prompt = sum(r["prompt_tokens"] for r in res)
    row = {"routing": name, "requests": len(res), "cached_rate": sum(r["cached"] for r in res) / prompt,
           "max_rate": sum(r["bound"] for r in res) / prompt,
           "ttft_p50_ms": statistics.median(r["ttft"] for r in res) * 1e3,
           "ttft_p99_ms": percentile([r["ttft"] for r in res], 0.99) * 1e3,
           "e2e_p50_ms": statistics.median(r["e2e"] for r in res) * 1e3,
           "req_per_s": len(res) / wall, "prompt_tok_per_s": prompt / wall}
    for key, short in (("requests", "req"), ("computed_tokens", "computed")):
        worst = 0.0
        for run in runs:
            vals = [v[key] for v in run["per_replica"].values()]
            mean = statistics.fmean(vals)
            worst = max(worst, max(vals) / mean if mean else float("nan"))
        row[f"{short}_max_over_mean"] = worst
    return row


# ---- the reference: one engine with all the memory -----------------------------------------------------------


def single_replica(args, path: str) -> dict:
    """The same users on one in-process engine with the summed KV cache: users start one step apart, and each
    sends its next turn as soon as its last one finished."""
    from nanovllm_ray import Config, LLMEngine, SamplingParams

    config = Config.from_kwargs(path, max_model_len=8192, num_kvcache_blocks=args.kv_blocks * args.replicas,
                                tensor_parallel_size=args.tensor_parallel_size,
                                block_size=args.block_size, max_num_seqs=64, max_num_batched_tokens=4096)
    engine = LLMEngine(config)
    chats = workload(args)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    ready = list(range(len(chats)))  # users, in the order they start
    running: dict[str, tuple[int, list[int]]] = {}
    out_ids: dict[str, list[int]] = {}
    prompt_tokens = cached_tokens = 0
    start = time.perf_counter()
    while ready or running:
        if ready:
            u = ready.pop(0)
            rid = f"u{u}-t{chats[u].turn}"
            p = chats[u].prompt()
            engine.add_request(rid, p, sp)
            running[rid] = (u, p)
            out_ids[rid] = []
        for o in engine.step():
            out_ids[o.request_id] += o.new_token_ids
            if o.finished:
                u, p = running.pop(o.request_id)
                prompt_tokens += len(p)
                cached_tokens += o.num_cached_tokens
                chats[u].reply(out_ids.pop(o.request_id))
                if not chats[u].done():
                    ready.insert(0, u)  # a waiting user's next turn goes before users not yet started
    engine.shutdown()
    return {"cached_rate": cached_tokens / prompt_tokens, "prompt_tokens": prompt_tokens,
            "wall_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Qwen3 checkpoint directory (default: the demo checkpoint of --shape)")
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (on GPU)")
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-prompts", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=1536)
    ap.add_argument("--message-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--stagger-s", type=float, default=0.1, help="between users' first requests")
    ap.add_argument("--think-s", type=float, default=2.0,
                    help="a user's mean pause between an answer and its next turn (uniform, 0.5x-1.5x); 0: "
                         "closed loop, the service saturated")
    ap.add_argument("--kv-blocks", type=int, default=2560, help="KV blocks per replica")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--routings", default="prefix_aware,ray")
    ap.add_argument("--prefix-routing", default="{}", help="JSON: tunables of prefix-aware routing")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each routing, in A B B A order (a shared machine drifts), pooled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = str(Path(demo_checkpoint(args.shape, args.model)).resolve())
    on_cpu = not torch.cuda.is_available()
    routings = args.routings.split(",")
    order = [r for i in range(args.rounds) for r in (routings if i % 2 == 0 else routings[::-1])]
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[dict]] = {r: [] for r in routings}
    try:
        for i, routing in enumerate(order):
            run = serve_run(args, path, routing, port, i)
            runs[routing].append(run)
            row = summarize(routing, [run])
            print(f"[{routing}] cached {row['cached_rate']:.3f}, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                  f"{row['req_per_s']:.2f} req/s, per replica {list(run['per_replica'].values())}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    torch.set_num_threads(1)  # as one replica has
    ref = single_replica(args, path)
    print(f"[single replica, {args.kv_blocks * args.replicas} blocks] cached {ref['cached_rate']:.3f}", flush=True)

    rows = [summarize(r, rs) for r, rs in runs.items()]
    for row in rows:
        row["of_single"] = row["cached_rate"] / ref["cached_rate"]
    what = f"{Path(path).name} on {device_name()}" + (" (tiny demo model on the CPU)" if on_cpu else "")
    print(f"\n{what}: {args.replicas} replicas x {args.kv_blocks} KV blocks, {args.users} users x {args.turns} "
          f"turns over {args.system_prompts} system prompts of {args.system_len} tokens, messages of "
          f"{args.message_len}, replies of {args.max_tokens}, think time {args.think_s} s; {args.rounds} runs "
          f"each, pooled; single replica (summed KV) cached rate {ref['cached_rate']:.3f}")
    print_table(rows)
    print("\nper replica, each run (requests / prompt tokens computed):")
    for r, rs in runs.items():
        for run in rs:
            loads = run["per_replica"].values()
            print(f"  {r}: " + ", ".join(f"{v['requests']} / {v['computed_tokens']:,}" for v in loads))
    decisions = [run["decisions"] for run in runs.get("prefix_aware", [])]
    for d in decisions:
        print(f"prefix-aware decisions: {d['num_decisions']} ({d['reasons']}), decision time p50 "
              f"{d['decision_us_p50']:.0f} us, p99 {d['decision_us_p99']:.0f} us (wall, in the ingress; its "
              f"thread's CPU: p50 {d['decision_cpu_us_p50']:.0f} us, p99 {d['decision_cpu_us_p99']:.0f} us); "
              f"router actor: {d['actor_reports']} reports, {d['actor_cpu_s']:.1f} s CPU")
    data = {"benchmark": "routing", "device": device_name(), "model": path, "config": vars(args), "order": order,
            "single_replica": ref, "rows": rows,
            "runs": {r: [{"per_replica": run["per_replica"], "decisions": run["decisions"], "wall_s": run["wall"],
                          "requests": [{k: v for k, v in x.items() if k != "ids"} for x in run["results"]]}
                         for run in rs] for r, rs in runs.items()}}
    write_result("routing", data, args.tag)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
