"""Tensor-parallel state: the rank and group size of this process (1 rank when torch.distributed is off), and the
one all-reduce the layers call."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanovllm_ray.layers import fast_all_reduce, ops

# This rank's fast all-reduce over symmetric memory (fast_all_reduce.py), set up by init_all_reduce; None: NCCL/gloo.
_fast: fast_all_reduce.SymmMemAllReduce | None = None
# The sentinel all-reduce, alone or fused with the residual add and RMSNorm (kernels/allreduce_norm.py), set up by
# init_all_reduce; the layers take it first where a message fits it.
_lamport = None


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def divide(a: int, b: int) -> int:
    assert a % b == 0, f"{a} is not divisible by {b}"
    return a // b


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor-parallel ranks, in place; returns x. Decode-sized messages go through the one-shot or
    two-shot kernel when init_all_reduce set it up (captured in CUDA graphs like any kernel), the rest through
    torch.distributed (NCCL, gloo on the CPU). Every rank must call it with the same shape and dtype."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if _lamport is not None and _lamport.eligible(x):
        return _lamport.all_reduce_(x)
    if _fast is not None and _fast.eligible(x):
        return _fast.all_reduce_(x)
    dist.all_reduce(x)
    return x


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-parallel layer's partial sums x: all-reduce them, add the residual, RMSNorm. Returns (normed, new
    residual), as ops.add_rms_norm does for the sum. One kernel where init_all_reduce set it up and x fits it; else
    the all-reduce, then the fused add + RMSNorm."""
    if _lamport is not None and _lamport.eligible(x, residual):
        return _lamport.add_rms_norm(x, residual, weight, eps)
    return ops.add_rms_norm(all_reduce(x), residual, weight, eps)


def fast_all_reduce_bytes(dtype: torch.dtype) -> int:
    """The largest message of `dtype` the fast all-reduce takes (0 where it is not set up or lacks the dtype)."""
    return _fast.max_bytes if _fast is not None and dtype in fast_all_reduce.DTYPES else 0


def init_all_reduce(enabled: bool = True, max_bytes: int = fast_all_reduce.DEFAULT_MAX_BYTES,
                    lamport: tuple[int, torch.dtype] | None = None) -> str:
    """Once per rank, after init_process_group and before CUDA graphs are captured (they bake in the buffer's
    address): set up the fast all-reduce where the group can use it, and with lamport (hidden size, dtype) the
    sentinel all-reduce, alone and fused with the residual add and RMSNorm. Collective. Returns the path taken, for
    the log."""
    global _fast, _lamport
    close_all_reduce()
    if not dist.is_initialized():
        return "none (one process)"
    backend = dist.get_backend()
    if not enabled:
        return f"{backend} (fast all-reduce off)"
    _fast, why = fast_all_reduce.create(dist.group.WORLD, max_bytes)
    if _fast is None:
        return f"{backend} ({why})"
    if lamport is not None:
        _lamport, how = fast_all_reduce.create_lamport(dist.group.WORLD, *lamport)
        why += f"; {how}"
    return why


def close_all_reduce() -> None:
    """Drop the fast all-reduce's buffer (before destroy_process_group)."""
    global _fast, _lamport
    for fast in (_fast, _lamport):
        if fast is not None:
            fast.close()
    _fast = _lamport = None
