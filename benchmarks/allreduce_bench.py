"""Time one all-reduce against message size: the sentinel kernel (nanovllm_ray/kernels/allreduce_norm.py, messages of
whole 4096-wide rows), the one-shot and two-shot kernels over symmetric memory (nanovllm_ray/layers/fast_all_reduce.py)
against NCCL, on N GPUs of this host; print a table, write JSON and a PNG.

    python benchmarks/allreduce_bench.py                      # all visible GPUs, bf16, 4 KiB .. 64 MiB
    python benchmarks/allreduce_bench.py --nprocs 2 --calls 50 --iters 20
    python benchmarks/allreduce_bench.py --plot benchmarks/results/allreduce-....json   # only the PNG

It starts one process a GPU itself (torch.multiprocessing, NCCL over localhost; no Ray). Each method is timed as a
decode step runs it: `calls` back-to-back all-reduces of one [numel] bf16 tensor captured in one CUDA graph, the
graph replayed `iters` times; the time per all-reduce is the replays' time / (iters x calls), on rank 0. `ours` is
what the layers' all_reduce does at that size (the sentinel kernel up to LAMPORT_MAX_BYTES, then
nanovllm_ray.layers.fast_all_reduce.choose_algo with the default buffer: NCCL above it). `ok`: each kernel's sum
equals NCCL's within bf16 rounding (exactly, for two ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, print_table, save_figure, time_cuda_graph, write_result

METHODS = ("nccl", "one_shot", "two_shot", "sentinel")
HIDDEN = 4096  # the sentinel kernel's row (qwen3-8b); it takes messages of whole rows, 8 KiB and up


def sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def _time_graph(fn, calls: int, iters: int) -> float:
    """Microseconds per call of fn, `calls` of them captured in one CUDA graph, replayed `iters` times; the first call
    (outside the graph) also sets up NCCL's communicator, and the ranks meet at a barrier before the timing."""
    import torch.distributed as dist

    return time_cuda_graph(fn, calls, iters, before_timing=dist.barrier)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    import torch.distributed as dist

    from nanovllm_ray.layers.fast_all_reduce import create, create_lamport

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    try:
        message_sizes = sizes(args.min_bytes, args.max_bytes)
        # One buffer as large as the largest message, so that both kernels are timed at every size.
        fast, why = create(dist.group.WORLD, max(message_sizes))
        sentinel = None
        if fast is not None:  # its buffer holds 2 x world messages: up to 16 MiB ones here
            sentinel, _ = create_lamport(dist.group.WORLD, HIDDEN, torch.bfloat16, min(max(message_sizes), 16 << 20))
        if rank == 0:
            print(f"{world} ranks: {why}", flush=True)
        rows = []
        for nbytes in message_sizes:
            rows.append(_measure(fast, sentinel, nbytes, rank, world, args))
            torch.cuda.empty_cache()
        if rank == 0:
            Path(out_path).write_text(json.dumps({"rows": rows, "setup": why}))
        for f in (fast, sentinel):
            if f is not None:
                f.close()
    finally:
        dist.destroy_process_group()


def _measure(fast, sentinel, nbytes: int, rank: int, world: int, args: argparse.Namespace) -> dict:
    """One message size: NCCL and (where set up) the kernels, timed in CUDA graphs; a row of the table."""
    import torch.distributed as dist

    from nanovllm_ray.layers.fast_all_reduce import DEFAULT_MAX_BYTES, LAMPORT_MAX_BYTES, choose_algo

    numel = nbytes // 2
    x = torch.zeros(numel, dtype=torch.bfloat16, device="cuda")  # zeros stay zeros through any number of sums
    calls = max(4, min(args.calls, (256 << 20) // nbytes))  # fewer calls a graph for large messages
    fns = {"nccl": lambda: dist.all_reduce(x)}
    if fast is not None:
        fns |= {a: (lambda a=a: fast.all_reduce_(x, a)) for a in ("one_shot", "two_shot")}
    if sentinel is not None and sentinel.eligible(x):
        fns["sentinel"] = lambda: sentinel.all_reduce_(x)
    us = {m: _time_graph(fn, calls, args.iters) for m, fn in fns.items()}
    ok = _check(fast, sentinel, numel, rank, world) if fast is not None else None
    algo = choose_algo(nbytes, world, DEFAULT_MAX_BYTES) if fast is not None else "nccl"
    if "sentinel" in us and nbytes <= LAMPORT_MAX_BYTES.get(world, 0):
        algo = "sentinel"  # what the layers' all_reduce takes first
    row = {"bytes": nbytes, "size": _human(nbytes), "calls": calls}
    row |= {f"{m}_us": round(us[m], 2) if m in us else None for m in METHODS}
    row |= {"algo": algo, "ours_us": round(us[algo], 2), "speedup": round(us["nccl"] / us[algo], 2), "ok": ok}
    if rank == 0:
        print(f"{row['size']:>8}: nccl {us['nccl']:8.2f} us, ours ({algo}) {us[algo]:8.2f} us", flush=True)
    return row


def _check(fast, sentinel, numel: int, rank: int, world: int) -> bool:
    """Each kernel's sum of random bf16 against NCCL's: exact for two ranks (one rounding either way), within bf16
    rounding of the partial sums for more."""
    import torch.distributed as dist

    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(numel, dtype=torch.bfloat16, device="cuda", generator=g)
    want = x.clone()
    dist.all_reduce(want)
    ok = True
    runs = [lambda t, a=a: fast.all_reduce_(t, a) for a in ("one_shot", "two_shot")]
    if sentinel is not None and sentinel.eligible(x):
        runs.append(sentinel.all_reduce_)
    for run in runs:
        got = run(x.clone())
        ok &= torch.equal(got, want) if world == 2 else torch.allclose(got, want, rtol=2e-2, atol=2e-2 * world)
    flag = torch.tensor([int(ok)], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _human(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (python benchmarks/allreduce_bench.py --plot JSON makes it)")
        return
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["bytes"] for r in rows]
    for m, style in (("nccl", "o-"), ("one_shot", "s-"), ("two_shot", "^-"), ("sentinel", "d-")):
        pts = [(b, r.get(f"{m}_us")) for b, r in zip(x, rows) if r.get(f"{m}_us") is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=m.replace("_", "-"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message (bytes, bf16)")
    ax.set_ylabel("time per all-reduce (us, in a CUDA graph)")
    ax.set_title(f"all-reduce on {data['num_gpus']} x {data['device']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=None, help="ranks, one GPU each (default: all visible)")
    ap.add_argument("--min-bytes", type=int, default=4 << 10)
    ap.add_argument("--max-bytes", type=int, default=64 << 20)
    ap.add_argument("--calls", type=int, default=50, help="all-reduces per CUDA graph (fewer for large messages)")
    ap.add_argument("--iters", type=int, default=20, help="graph replays timed")
    ap.add_argument("--tag", default="")
    ap.add_argument("--plot", metavar="JSON", help="only make the PNG of an earlier run's JSON")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    gpus = torch.cuda.device_count()
    world = args.nprocs or gpus
    if gpus < 2 or world > gpus or world < 2:
        raise SystemExit(f"needs 2 or more GPUs for {world} ranks; {gpus} visible")
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        t = time.perf_counter()
        mp.spawn(_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
        result = json.loads(Path(out).read_text())
    rows = result["rows"]
    print(f"\nall-reduce of bf16 on {world} x {device_name()} ({result['setup']}), "
          f"{time.perf_counter() - t:.0f} s")
    print_table([{k: "-" if v is None else v for k, v in r.items() if k != "bytes"} for r in rows])
    data = {"benchmark": "allreduce", "device": device_name(), "num_gpus": world, "torch": torch.__version__,
            "setup": result["setup"], "config": vars(args), "rows": rows}
    path = write_result("allreduce", data, args.tag)
    plot(data, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
