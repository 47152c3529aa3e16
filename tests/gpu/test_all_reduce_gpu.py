"""The layers' all_reduce on several GPUs (one process a GPU, NCCL): the sentinel kernel (kernels/allreduce_norm.py,
[rows, 4096] bf16 messages up to its size), the one-shot and two-shot kernels over symmetric memory give NCCL's sum of
random bf16, exactly with two ranks (one rounding either way), within bf16 rounding with more; eagerly and replayed
from a CUDA graph; messages the fast path does not take (unaligned, float16, larger than the buffer) still sum right
through NCCL."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch

NUM_GPUS = torch.cuda.device_count()
SIZES = [n for n in (2, 4, 8) if n <= NUM_GPUS]
# For a rank that sees one GPU: whether the parent, which sees them all, found P2P access between GPUs 0 and 1.
_P2P = os.environ.get("_TEST_P2P", "1") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 2, reason=f"needs 2 GPUs, {NUM_GPUS} visible")]

HIDDEN = 4096  # qwen3-8b
# (rows, cols, dtype): decode batches of 1 .. 512 rows (8 KiB .. 4 MiB), an odd row count, float32, and three the
# fast path leaves to NCCL: float16 (no kernel for it), an unaligned size, and more than the buffer.
CASES = [(1, HIDDEN, torch.bfloat16), (3, HIDDEN, torch.bfloat16), (7, 1024, torch.bfloat16),
         (256, HIDDEN, torch.bfloat16), (512, HIDDEN, torch.bfloat16), (16, HIDDEN, torch.float32),
         (4, HIDDEN, torch.float16), (1, 1001, torch.bfloat16), (1200, HIDDEN, torch.bfloat16)]
BUFFER = 8 << 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(got: torch.Tensor, want: torch.Tensor, world: int) -> str | None:
    """None if got is NCCL's sum up to the summation order, else what differs."""
    if world == 2 and torch.equal(got, want):
        return None
    if world > 2 and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * world):
        return None
    return f"max |diff| {(got.float() - want.float()).abs().max().item():.4g}"


def _in_graph(x: torch.Tensor, world: int) -> list[str]:
    """parallel.all_reduce captured in a CUDA graph (a static input copied into the reduced tensor), replayed
    twice with new values, against NCCL's sums."""
    import torch.distributed as dist

    from nanovllm_ray.layers import parallel

    static_in, static_out = x.clone(), torch.empty_like(x)

    def step() -> None:
        static_out.copy_(static_in)
        parallel.all_reduce(static_out)

    step()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    failures = []
    for scale in (1.0, -2.0):
        static_in.copy_(x * scale)
        graph.replay()
        want = x * scale
        dist.all_reduce(want)
        if (why := _same(static_out, want, world)) is not None:
            failures.append(f"{tuple(x.shape)} {x.dtype} in a CUDA graph, x{scale}: {why}")
    torch.cuda.synchronize()
    return failures


def _fused_norm(world: int) -> list[str]:
    """The sentinel all-reduce fused with the residual add and RMSNorm (kernels/allreduce_norm.py) against NCCL's
    sum then ops.add_rms_norm: eagerly at several row counts in a row (both slots of its buffer, rows on every
    program, more rows than programs), alone and fused in turn, and replayed from CUDA graphs of two sizes,
    interleaved; every rank must hold the same bits."""
    import torch.distributed as dist

    from nanovllm_ray.layers import parallel
    from nanovllm_ray.layers.ops import add_rms_norm

    fused = parallel._lamport
    if fused is None:
        return ["sentinel all-reduce not set up"]
    rank, failures = dist.get_rank(), []
    weight = torch.rand(HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)).bfloat16()

    def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(100 * seed + rank)
        x = torch.randn(rows, HIDDEN, device="cuda", generator=g).bfloat16()
        res = torch.randn(rows, HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        return x, res.bfloat16()

    def check(got: tuple, x: torch.Tensor, res: torch.Tensor, what: str) -> None:
        total = x.clone()
        dist.all_reduce(total)
        want, want_res = add_rms_norm(total, res, weight, 1e-6)
        if not torch.equal(got[1], want_res) and world == 2:
            failures.append(f"{what}: residual differs by {(got[1].float() - want_res.float()).abs().max():.3g}")
        if not torch.allclose(got[0].float(), want.float(), rtol=1e-2, atol=2e-2):
            failures.append(f"{what}: normed differs by {(got[0].float() - want.float()).abs().max():.3g}")
        gathered = [torch.empty_like(got[0]) for _ in range(world)]
        dist.all_gather(gathered, got[0].contiguous())
        if not all(torch.equal(gathered[0], y) for y in gathered):
            failures.append(f"{what}: ranks hold different outputs")

    for i, rows in enumerate([1, 3, 1, 33, fused.max_rows, 2, fused.max_rows, 1, 200]):
        x, res = inputs(rows, i)
        check(fused.add_rms_norm(x, res, weight, 1e-6), x, res, f"eager {rows} rows, call {i}")
        want = x.clone()
        dist.all_reduce(want)
        if (why := _same(fused.all_reduce_(x.clone()), want, world)) is not None:
            failures.append(f"sentinel all-reduce alone, {rows} rows after call {i}: {why}")
    graphs = {}
    for rows in (1, min(64, fused.max_rows)):
        x, res = inputs(rows, 50 + rows)
        static = (x.clone(), res.clone())
        fused.add_rms_norm(*static, weight, 1e-6)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused.add_rms_norm(*static, weight, 1e-6)
        graphs[rows] = (graph, static, out)
    for i in range(6):
        rows = (1, min(64, fused.max_rows))[i % 2]
        graph, static, out = graphs[rows]
        x, res = inputs(rows, 70 + i)
        static[0].copy_(x)
        static[1].copy_(res)
        graph.replay()
        check(out, x, res, f"graph {rows} rows, replay {i}")
    torch.cuda.synchronize()
    return failures


def _rank(rank: int, world: int, port: int, errors, isolated: bool = False) -> None:
    """One rank: on GPU `rank`, or (isolated) on the only GPU its CUDA_VISIBLE_DEVICES shows, as a Ray actor is."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
    import torch.distributed as dist

    from nanovllm_ray.layers import fast_all_reduce, parallel

    try:
        torch.cuda.set_device(0 if isolated else rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        path = parallel.init_all_reduce(True, BUFFER, lamport=(HIDDEN, torch.bfloat16))
        fast = parallel._fast
        if isolated:
            assert torch.cuda.device_count() == 1
            p2p = _P2P
        else:
            p2p = all(torch.cuda.can_device_access_peer(rank, j) for j in range(world) if j != rank)
        assert fast is not None or not p2p, f"P2P between the GPUs, yet the fast path is off: {path}"
        failures = []
        for rows, cols, dtype in CASES:
            g = torch.Generator(device="cuda").manual_seed(1000 * rank + rows)
            x = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
            want = x.clone()
            dist.all_reduce(want)
            eligible = fast is not None and fast.eligible(x)
            fits = rows * cols * x.element_size() <= BUFFER and dtype != torch.float16 and cols % 8 == 0
            if fast is not None and eligible != fits:
                failures.append(f"{rows}x{cols} {dtype}: eligible={eligible}")
            # Eager, through the layers' function (whatever path it takes), then each kernel forced.
            runs = {"all_reduce": lambda t: parallel.all_reduce(t)}
            if eligible:
                runs |= {a: (lambda t, a=a: fast.all_reduce_(t, a)) for a in ("one_shot", "two_shot")}
            for name, fn in runs.items():
                got = fn(x.clone())
                if (why := _same(got, want, world)) is not None:
                    failures.append(f"{rows}x{cols} {dtype} {name} eager: {why}")
            failures += _in_graph(x, world)
        # Every rank holds the same sum (the kernels add in rank order everywhere).
        x = torch.randn(5, HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(rank))
        x = parallel.all_reduce(x.bfloat16())
        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x)
        if not all(torch.equal(gathered[0], y) for y in gathered):
            failures.append("ranks hold different sums")
        if fast is not None and not isolated:
            failures += _fused_norm(world)
        if rank == 0:
            print(f"\n{world} ranks: {path}; one-shot up to "
                  f"{fast_all_reduce.ONE_SHOT_MAX_BYTES.get(world, 0) >> 10} KiB")
        parallel.close_all_reduce()
        dist.destroy_process_group()
        if failures:
            errors.put((rank, "; ".join(failures)))
    except Exception:
        errors.put((rank, traceback.format_exc()))


def _collect(errors) -> None:
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(f"rank {r}: {e}" for r, e in sorted(found))


@pytest.mark.parametrize("world", SIZES)
def test_fast_all_reduce_matches_nccl(world):
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(world, _free_port(), errors), nprocs=world, join=True, start_method="spawn")
    _collect(errors)


def test_isolated_devices():
    """Two ranks that each see only their own GPU (CUDA_VISIBLE_DEVICES, as Ray sets it for a rank actor): the
    buffers still map across the processes, and the sums are right."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors, port = ctx.SimpleQueue(), _free_port()
    p2p = torch.cuda.can_device_access_peer(0, 1)
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "_TEST_P2P")}
    procs = []
    try:
        os.environ["_TEST_P2P"] = "1" if p2p else "0"
        for rank in range(2):
            os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # a spawned child starts with this environment
            procs.append(ctx.Process(target=_rank, args=(rank, 2, port, errors, True)))
            procs[-1].start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for p in procs:
        p.join(timeout=300)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    _collect(errors)
