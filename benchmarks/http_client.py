"""A load-generating HTTP client process for the serving benchmarks (no torch import: it starts in well under a
second). Each process runs a closed loop of `concurrency` streams over its share of the requests.

    python benchmarks/http_client.py SPEC.json     # prints "ready", waits for a line on stdin, runs, writes OUT

SPEC: {"url": ..., "bodies": [request bodies], "concurrency": k, "out": path}. OUT: one record per request,
{"sent", "first", "end", "tokens", "chunks": [[arrival, tokens in the chunk or -1 when unknown], ...]} (times
are time.monotonic(), one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


async def stream_completion(client, url: str, body: dict):
    """POST a streaming request; yields (arrival time, parsed chunk) for each `data: {...}` server event. The body
    is split on event boundaries by hand (cheaper than line iteration under hundreds of streams)."""
    buf = b""
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for data in r.aiter_bytes():
            now = time.monotonic()
            buf += data
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: {"):
                    yield now, json.loads(ev[6:])


async def one(client, url: str, body: dict) -> dict[str, Any]:
    sent = time.monotonic()
    if not body.get("stream"):
        r = await client.post(url, json=body)
        r.raise_for_status()
        return {"sent": sent, "first": None, "end": time.monotonic(), "tokens": r.json()["usage"]["completion_tokens"],
                "chunks": []}
    chunks: list[tuple[float, int]] = []  # (arrival, tokens or -1 when unknown)
    tokens = 0
    async for now, msg in stream_completion(client, url, body):
        if msg.get("usage"):
            tokens = msg["usage"]["completion_tokens"]
        for ch in msg.get("choices") or ():
            if "token_ids" in ch:
                if ch["token_ids"]:
                    chunks.append((now, len(ch["token_ids"])))
            elif (ch.get("delta") or {}).get("content") or ch.get("text"):
                chunks.append((now, -1))
    return {"sent": sent, "first": chunks[0][0] if chunks else None, "end": time.monotonic(), "tokens": tokens,
            "chunks": chunks}


async def run(url: str, bodies: list[dict], concurrency: int, ready) -> list[dict]:
    import httpx

    todo = list(enumerate(bodies))
    results: list[dict] = [{}] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await ready()

        async def worker() -> None:
            while todo:
                i, body = todo.pop(0)
                results[i] = await one(client, url, body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())

    async def ready() -> None:  # everything imported and set up: wait for the parent's go
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    results = asyncio.run(run(spec["url"], spec["bodies"], spec["concurrency"], ready))
    with open(spec["out"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
