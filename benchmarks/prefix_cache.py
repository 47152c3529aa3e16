"""The prefix cache on one engine, in this process (no Serve): how many prompt tokens it serves from cache against
the block-aligned maximum the workload allows, and what that saves in prefill time.

    python benchmarks/prefix_cache.py                      # tiny demo model on the CPU (about a minute)
    python benchmarks/prefix_cache.py --shape qwen3-0.6b --prompt-len 2048

Workloads (random token ids, greedy, ignore_eos; requests issued one at a time, so each can reuse everything
issued before it):
  shared_prefix  100 requests of --prompt-len tokens; 70% of them share their first 80% (the rest are unique)
  multi_turn     --users conversations of --turns turns over one system prompt; each turn's prompt is the
                 conversation so far (system prompt, earlier user messages and replies) plus a new user message

The maximum is block-aligned: a prompt can reuse the full blocks (block_size tokens) of its longest prefix that
an earlier request computed (its prompt, or its prompt and reply for a finished one), leaving its last token to
compute, as the engine does. Each workload runs with prefix caching on and off; "prefill" is the time from
adding a request to its first token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from benchmarks.common import demo_checkpoint, device_name, print_table, write_result
from nanovllm_ray.kv_events import prefix_block_hashes

VOCAB = (1000, 150000)  # token ids drawn from here: ordinary tokens, no special ones


def random_ids(rng: Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


class ReuseBound:
    """The block-aligned maximum a prefix cache with unlimited memory could serve: blocks of any earlier
    request's prompt (and, once it finished, of its prompt and reply) count as reusable."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.known: set[int] = set()

    def reusable(self, prompt: list[int]) -> int:
        bs = self.block_size
        n = 0
        for h in prefix_block_hashes(prompt, bs, max_blocks=(len(prompt) - 1) // bs):
            if h not in self.known:
                break
            n += 1
        return n * bs

    def add(self, tokens: list[int]) -> None:
        self.known.update(prefix_block_hashes(tokens, self.block_size))


@dataclass
class Chat:
    """One user's conversation: the prompt of the next turn is everything so far plus a new user message."""

    system: list[int]
    messages: list[list[int]]  # the user's messages, one per turn
    replies: list[list[int]] = field(default_factory=list)

    @property
    def turn(self) -> int:
        return len(self.replies)

    def done(self) -> bool:
        return self.turn >= len(self.messages)

    def prompt(self) -> list[int]:
        ids = list(self.system)
        for msg, reply in zip(self.messages, self.replies):
            ids += msg + reply
        return ids + self.messages[self.turn]

    def reply(self, token_ids: list[int]) -> None:
        self.replies.append(list(token_ids))


def make_chats(rng: Random, num_users: int, num_turns: int, system_prompts: list[list[int]],
               message_len: int) -> list[Chat]:
    return [Chat(system_prompts[u % len(system_prompts)], [random_ids(rng, message_len) for _ in range(num_turns)])
            for u in range(num_users)]


def shared_prefix_prompts(rng: Random, n: int, prompt_len: int, share: float = 0.7,
                          prefix_frac: float = 0.8) -> list[list[int]]:
    """n prompts of prompt_len tokens; round(share * n) of them start with one prefix of prefix_frac of it."""
    prefix = random_ids(rng, int(prompt_len * prefix_frac))
    num_shared = round(share * n)
    prompts = [prefix + random_ids(rng, prompt_len - len(prefix)) for _ in range(num_shared)]
    prompts += [random_ids(rng, prompt_len) for _ in range(n - num_shared)]
    rng.shuffle(prompts)
    return prompts


# ---- one engine, one request at a time -----------------------------------------------------------------------


def run_one(engine, prompt: list[int], max_tokens: int, rid: str) -> tuple[float, int, list[int]]:
    """(seconds to the first token, cached prompt tokens, generated token ids) of one request alone."""
    from nanovllm_ray import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    engine.add_request(rid, prompt, sp)
    first = None
    ids: list[int] = []
    cached = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if first is None and o.new_token_ids:
                first = time.perf_counter() - start
            ids += o.new_token_ids
            cached = o.num_cached_tokens
    assert first is not None
    return first, cached, ids


@dataclass
class Tally:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    bound_tokens: int = 0
    prefill_s: list[float] = field(default_factory=list)

    def add(self, prompt_len: int, cached: int, bound: int, prefill_s: float) -> None:
        self.prompt_tokens += prompt_len
        self.cached_tokens += cached
        self.bound_tokens += bound
        self.prefill_s.append(prefill_s)


def run_shared_prefix(engine, prompts: list[list[int]], block_size: int) -> Tally:
    bound, tally = ReuseBound(block_size), Tally()
    for i, p in enumerate(prompts):
        b = bound.reusable(p)
        bound.add(p)
        ttft, cached, _ = run_one(engine, p, 1, f"sp-{i}")
        tally.add(len(p), cached, b, ttft)
    return tally


def run_multi_turn(engine, chats: list[Chat], max_tokens: int, block_size: int) -> Tally:
    """Round robin over the users, turn by turn: every conversation's history waits in the cache meanwhile."""
    bound, tally = ReuseBound(block_size), Tally()
    while not all(c.done() for c in chats):
        for u, c in enumerate(chats):
            if c.done():
                continue
            p = c.prompt()
            b = bound.reusable(p)
            ttft, cached, ids = run_one(engine, p, max_tokens, f"mt-{u}-{c.turn}")
            bound.add(p + ids[:-1])  # the last token's KV is never computed
            c.reply(ids)
            tally.add(len(p), cached, b, ttft)
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Qwen3 checkpoint directory (default: the demo checkpoint of --shape)")
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=1024, help="shared_prefix: tokens per prompt")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--message-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16, help="multi_turn: tokens per reply")
    ap.add_argument("--num-kvcache-blocks", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    from nanovllm_ray import Config, LLMEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(Path(demo_checkpoint(args.shape, args.model)).resolve())
    on_cpu = not torch.cuda.is_available()
    rows, data_rows = [], []
    for workload in ("shared_prefix", "multi_turn"):
        for caching in (True, False):
            config = Config.from_kwargs(path, max_model_len=8192, num_kvcache_blocks=args.num_kvcache_blocks,
                                        block_size=args.block_size, enable_prefix_caching=caching,
                                        max_num_batched_tokens=8192)
            engine = LLMEngine(config)
            run_one(engine, random_ids(Random(99), 64), 2, "warm-up")
            engine.block_manager.reset_prefix_cache()
            rng = Random(0)  # the same requests with caching on and off
            start = time.perf_counter()
            if workload == "shared_prefix":
                tally = run_shared_prefix(engine, shared_prefix_prompts(rng, args.requests, args.prompt_len),
                                          args.block_size)
            else:
                system = random_ids(rng, args.system_len)
                chats = make_chats(rng, args.users, args.turns, [system], args.message_len)
                tally = run_multi_turn(engine, chats, args.max_tokens, args.block_size)
            wall = time.perf_counter() - start
            engine.shutdown()
            rate = tally.cached_tokens / tally.prompt_tokens
            bound = tally.bound_tokens / tally.prompt_tokens
            row = {"workload": workload, "prefix_cache": "on" if caching else "off",
                   "requests": len(tally.prefill_s), "prompt_tokens": tally.prompt_tokens,
                   "cached_tokens": tally.cached_tokens, "cached_rate": rate, "max_rate": bound,
                   "of_max": rate / bound if bound else float("nan"), "prefill_total_s": sum(tally.prefill_s),
                   "prefill_p50_ms": statistics.median(tally.prefill_s) * 1e3, "wall_s": wall}
            rows.append(row)
            data_rows.append(row)
            print(f"{workload} prefix cache {'on' if caching else 'off'}: {rate:.3f} cached ({bound:.3f} max), "
                  f"prefill {row['prefill_total_s']:.2f} s", flush=True)
    for w in ("shared_prefix", "multi_turn"):
        on, off = (r for r in rows if r["workload"] == w)
        on["prefill_speedup"] = off["prefill_total_s"] / on["prefill_total_s"]
        off["prefill_speedup"] = 1.0
    print(f"\n{Path(path).name} on {device_name()}{' (tiny demo model on the CPU)' if on_cpu else ''}, "
          f"block_size {args.block_size}, {args.num_kvcache_blocks} KV blocks")
    print_table(rows)
    data = {"benchmark": "prefix_cache", "device": device_name(), "model": path, "config": vars(args),
            "rows": data_rows}
    write_result("prefix_cache", data, args.tag)


if __name__ == "__main__":
    main()
