"""Start-up's compile caches under one directory (nanovllm_ray/caches.py): NANOVLLM_CACHE_DIR places Triton's and
Inductor's; a variable the user set wins; Python's bytecode goes there only where Python would not keep it (the
packages' own directories read-only, or PYTHONDONTWRITEBYTECODE), unless NANOVLLM_BYTECODE_CACHE=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nanovllm_ray import caches

PROBE = ("import json, os, sys; import nanovllm_ray; print(json.dumps([os.environ.get(k) for k in "
         "('TRITON_CACHE_DIR', 'TORCHINDUCTOR_CACHE_DIR')] + [sys.pycache_prefix]))")


def _probe(env: dict) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_directory_for_the_caches_and_the_users_variables_win(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                                                              "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    env[caches.ENV] = str(tmp_path / "c")
    triton, inductor, prefix = _probe(env)
    assert (triton, inductor) == (str(tmp_path / "c" / "triton"), str(tmp_path / "c" / "inductor"))
    assert prefix is None  # this virtualenv is writable: Python keeps its bytecode beside the sources
    # PYTHONDONTWRITEBYTECODE: the bytecode goes to the cache (never beside the sources), unless turned off
    assert _probe({**env, "PYTHONDONTWRITEBYTECODE": "1"})[2] == str(tmp_path / "c" / "pycache")
    assert _probe({**env, "PYTHONDONTWRITEBYTECODE": "1", "NANOVLLM_BYTECODE_CACHE": "0"})[2] is None
    env["TRITON_CACHE_DIR"] = str(tmp_path / "mine")
    assert _probe(env)[0] == str(tmp_path / "mine")


def test_bytecode_goes_to_the_cache_where_the_packages_are_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv(caches.ENV, str(tmp_path))
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "")  # recorded as it was, so that what setup_caches sets is undone
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    monkeypatch.delenv("NANOVLLM_BYTECODE_CACHE", raising=False)
    monkeypatch.setattr(caches, "_bytecode_writable", lambda package: False)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert caches.setup_caches() == str(tmp_path)
    assert sys.pycache_prefix == str(tmp_path / "pycache") == os.environ["PYTHONPYCACHEPREFIX"]
