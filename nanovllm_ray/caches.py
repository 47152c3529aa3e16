"""Where start-up's caches live: one directory, NANOVLLM_CACHE_DIR (default ~/.cache/nanovllm_ray), for Triton's
compiled kernels (triton/), Inductor's generated code (inductor/) and Python's bytecode (pycache/) where Python
would otherwise not keep it: the installed packages' own __pycache__ cannot be written, or PYTHONDONTWRITEBYTECODE
is set. A variable already set wins: TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, PYTHONPYCACHEPREFIX;
NANOVLLM_BYTECODE_CACHE=0 leaves Python's bytecode alone.

Applied when nanovllm_ray is imported, before torch is: the variables reach Triton and Inductor, and processes
started from this one (Ray's workers on a cluster this process starts) inherit them. The H200 machine sets
PYTHONDONTWRITEBYTECODE and ships torch without bytecode, so every process compiled torch's, sympy's and Triton's
sources again: 6.4 s of a start under cProfile (benchmarks/startup.py --profile); a second start took 21.8 s with
that, 8.6 s with the bytecode kept.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ENV = "NANOVLLM_CACHE_DIR"


def cache_root() -> str:
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "nanovllm_ray")


def _bytecode_writable(package: str) -> bool:
    """Whether Python can write bytecode next to `package`'s sources (then it keeps its own cache there)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return True
    cache = os.path.join(os.path.dirname(spec.origin), "__pycache__")
    return os.access(cache, os.W_OK) if os.path.isdir(cache) else os.access(os.path.dirname(cache), os.W_OK)


def setup_caches() -> str | None:
    """Point the caches at cache_root() where nothing else does; the root, or None if it cannot be made."""
    root = cache_root()
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        return None
    if not os.access(root, os.W_OK):
        return None
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "inductor"))
    if (os.environ.get("NANOVLLM_BYTECODE_CACHE") != "0" and sys.pycache_prefix is None
            and (sys.dont_write_bytecode or not _bytecode_writable("torch"))):
        # into this directory only, never beside the sources
        sys.pycache_prefix = os.path.join(root, "pycache")
        sys.dont_write_bytecode = False
        os.environ.setdefault("PYTHONPYCACHEPREFIX", sys.pycache_prefix)
    return root
