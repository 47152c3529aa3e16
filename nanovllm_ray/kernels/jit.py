"""Compiling the Triton kernels side by side before start-up runs them.

Triton compiles a kernel the first time it is launched with a new specialisation (its constexprs, and integers
and pointers by divisibility), about 0.3-2 s each, one at a time: on a machine with empty caches that was most of a
first start (the profile pass, the warm-up steps and each CUDA graph's batch). Inside compile_only() every launch
that goes through launch() only hands its kernel to a thread pool to compile (Triton's async compile, the same key
as the launch would have) and launches nothing; leaving it waits for all of them, and builds their launchers (which
Triton would build at the first launch, one at a time) side by side too. So the runner first goes through
those steps once compiling only, then runs them for real, and each kernel is found compiled.

A step run under compile_only() computes garbage: the outputs of the kernels it skipped are left as allocated. Code
that feeds a kernel's output to an indexing op asks compiling() and hands on something valid instead (see
elementwise.merge_pending and decode_inputs). Kernels whose skipping would break state across calls (the Lamport
all-reduce's buffers) launch with their plain `kernel[grid]`, so they run (compiled in turn) in that pass too.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.runtime import _async_compile

# Kernels run in Triton's interpreter (the CPU tests), which lacks libdevice's functions.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_compiling = False
_seen: set = set()  # (kernel, argument specialisations) a compile_only() pass has submitted


def compiling() -> bool:
    """Inside compile_only(): kernels are compiled, not launched."""
    return _compiling


def launch(kernel, grid):
    """kernel[grid], or inside compile_only() the kernel's compile for those arguments, on the pool."""
    return functools.partial(_compile, kernel, grid) if _compiling else kernel[grid]


def _compile(kernel, grid, *args, **kwargs) -> None:
    # A pass calls a kernel thousands of times with a few hundred distinct arguments; Triton's own lookup before it
    # finds a compile already submitted costs ~0.3 ms a call. The key is finer than Triton's (values, where Triton
    # keeps an integer's divisibility), so a repeat skipped here is one Triton would have found submitted.
    key = (kernel, tuple(map(_spec, args)), tuple((k, _spec(v)) for k, v in kwargs.items()))
    if key not in _seen:
        _seen.add(key)
        kernel.warmup(*args, grid=grid, **kwargs)


def _spec(value):
    """A tensor by its dtype and 16-byte alignment (what Triton specialises a pointer on); anything else by its
    type and value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return type(value), value


@contextlib.contextmanager
def compile_only(workers: int | None = None, ignore_errors: bool = False):
    """Compile, rather than launch, what launch() is given; on leaving, wait for every compile, then build each
    kernel's launcher and load it on the GPU, side by side too. Yields Triton's AsyncCompileMode (its future_kernels:
    one per distinct kernel compiled). ignore_errors: a kernel that fails to compile or load (a tile sweep's config
    that does not fit) is left out rather than raised."""
    global _compiling
    assert not _compiling, "compile_only() does not nest"
    # Past ~16 threads the compiles mostly wait on each other (the Python parts of Triton's hold the GIL).
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=ignore_errors)
        try:
            with mode:
                _compiling = True
                try:
                    yield mode
                finally:
                    _compiling = False
                    _seen.clear()
        finally:
            # Triton's mode stays active when a compile raises on leaving it: every later compile in the process
            # would then go to this pool, shut down ("cannot schedule new futures after shutdown").
            if _async_compile.active_mode.get() is mode:
                _async_compile.active_mode.set(None)
        compiled = [f.kernel for f in mode.future_kernels.values() if f.kernel is not None]
        device = torch.cuda.current_device() if compiled else None
        loads = [pool.submit(_load, kernel, device) for kernel in compiled]
        for load in loads:
            try:
                load.result()
            except Exception:
                if not ignore_errors:
                    raise


def _load(kernel, device: int) -> None:
    """What Triton does at a kernel's first launch: build its launcher (a C module, compiled with the host's C
    compiler: a few tenths of a second each) and load its binary on the device."""
    torch.cuda.set_device(device)
    kernel._init_handles()
