"""The layers' all_reduce off the GPU: the one-shot/two-shot/NCCL policy by message size and rank count, and on
gloo (two CPU processes) the fast path stays off and the sums go through torch.distributed. The kernels themselves
are tested on GPUs: tests/gpu/test_all_reduce_gpu.py."""

from __future__ import annotations

import socket
import traceback

import pytest
import torch

from nanovllm_ray.config import Config
from nanovllm_ray.layers.fast_all_reduce import DEFAULT_MAX_BYTES, ONE_SHOT_MAX_BYTES, choose_algo

MiB, KiB = 1 << 20, 1 << 10


@pytest.mark.parametrize("nbytes, world, algo", [
    (8 * KiB, 1, "nccl"),  # one rank: nothing to reduce
    (8 * KiB, 2, "one_shot"),  # a batch-1 decode step of a 4096-wide bf16 model
    (1 * MiB, 2, "one_shot"),
    (2 * MiB, 2, "two_shot"),  # a batch-256 decode step
    (DEFAULT_MAX_BYTES, 2, "two_shot"),
    (DEFAULT_MAX_BYTES + 16, 2, "nccl"),  # larger than the buffer
    (8 * KiB + 2, 2, "nccl"),  # not a whole number of 16-byte vectors
    (0, 2, "nccl"),
    (ONE_SHOT_MAX_BYTES[4], 4, "one_shot"),
    (ONE_SHOT_MAX_BYTES[4] + 16, 4, "two_shot"),
    (ONE_SHOT_MAX_BYTES[8], 8, "one_shot"),
    (ONE_SHOT_MAX_BYTES[8] + 16, 8, "two_shot"),
    (8 * KiB, 6, "one_shot"),  # any N: the kernels' generic path
    (4 * MiB, 6, "two_shot"),
])
def test_policy(nbytes, world, algo):
    assert choose_algo(nbytes, world, DEFAULT_MAX_BYTES) == algo


def test_policy_one_shot_shrinks_with_ranks():
    """More ranks: one-shot reads (N - 1) x the message per rank, two-shot 2 (N - 1) / N x: two-shot takes over at
    smaller messages."""
    limits = [ONE_SHOT_MAX_BYTES[n] for n in (2, 4, 8)]
    assert limits == sorted(limits, reverse=True)
    assert all(limit <= DEFAULT_MAX_BYTES and limit % 16 == 0 for limit in limits)


def test_config_switch():
    setting = {name: (default, help) for name, _, default, help in Config.settings()}
    assert setting["fast_all_reduce"][0] is True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, errors) -> None:
    import torch.distributed as dist

    from nanovllm_ray.layers import parallel

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        path = parallel.init_all_reduce(True)
        assert parallel._fast is None and path.startswith("gloo"), path
        x = torch.arange(8 * 4096, dtype=torch.float32).view(8, 4096) * (rank + 1)
        y = parallel.all_reduce(x)
        assert y is x  # in place
        torch.testing.assert_close(x, torch.arange(8 * 4096, dtype=torch.float32).view(8, 4096) * 3)
        assert parallel.init_all_reduce(False).startswith("gloo (fast all-reduce off)")
        parallel.close_all_reduce()
        dist.destroy_process_group()
    except Exception:
        errors.put((rank, traceback.format_exc()))


def test_gloo_falls_back():
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_gloo_rank, args=(2, _free_port(), errors), nprocs=2, join=True, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(f"rank {r}: {e}" for r, e in sorted(found))


def test_one_process_is_a_no_op():
    from nanovllm_ray.layers import parallel

    x = torch.ones(4, 16)
    assert parallel.all_reduce(x) is x and bool((x == 1).all())
