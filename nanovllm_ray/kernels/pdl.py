"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel before
it on the stream still runs, once every program of that one has let it (gdc_launch_dependents), and waits for that
kernel's end and its writes (gdc_wait) where it needs them. Captured in CUDA graphs as programmatic edges.

In a batch-1 decode step, where kernels are a few microseconds each, the next kernel's launch and its first loads
(weights, which no kernel writes) then overlap the previous one. The rule that keeps results in stream order: a PDL
kernel calls wait() in every program before it reads or writes anything the kernels before it may touch, and only
then lets its own dependents launch, so at most one kernel runs ahead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_enabled = True


def enable(enabled: bool = True) -> None:
    """Launch the decode-path kernels as programmatic dependents where the GPU supports it (off: for comparison)."""
    global _enabled
    _enabled = enabled


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use(t: torch.Tensor) -> bool:
    """Whether a kernel on t's device launches as a programmatic dependent (launch_pdl=, PDL=)."""
    return _enabled and t.is_cuda and _supported(t.device.index if t.device.index is not None else 0)


@triton.jit
def wait():
    """The kernel before has finished and its writes are visible; then the next kernel may launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
