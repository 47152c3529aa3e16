"""A real Ray cluster with Serve for one test module: started once, torn down at the module's end."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.launch import DRAIN_ENV, HAPROXY_ENV, serve_environment

VENV_BIN = Path(sys.executable).parent


_given: set[int] = set()


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768 and up): a port
    the kernel hands out (bind to 0) can be handed again to one of Ray's own sockets before the test's server binds it
    (CI once saw HAProxy fail with "Address already in use" that way, and another server answer on the port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        if port in _given:  # several asked for at once (a cluster's ports) must differ
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    raise RuntimeError("no free port in 20000-32767")


@dataclass
class ServeCluster:
    http_url: str  # http://127.0.0.1:PORT
    metrics_url: str  # Ray's Prometheus endpoint on this node

    def llm_handle(self, app: str):
        from ray import serve

        return serve.get_deployment_handle("LLMServer", app_name=app)

    def llm_stats(self, app: str) -> dict[str, Any]:
        return self.llm_handle(app).stats.remote().result(timeout_s=30)


def cluster_environment(haproxy: bool | None = None) -> dict[str, str]:
    """What the cluster's processes see: HTTP as `deployments.launch` sets it up (Serve's HAProxy ingress where
    HAProxy is installed; haproxy=False: Serve's proxy actor), a 1 s drain for a stopping replica."""
    env = dict(os.environ)
    if haproxy is not None:
        env[HAPROXY_ENV] = "1" if haproxy else "0"
    env.setdefault(DRAIN_ENV, "1")
    return serve_environment(env)


@contextmanager
def ray_cluster(num_cpus: int = 2, haproxy: bool | None = None) -> Iterator[int]:
    """ray.init for one module; yields the metrics export port. The cluster's processes start with this process's
    environment, set for the time being to cluster_environment(haproxy)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = free_port()
    saved = dict(os.environ)
    os.environ.update(cluster_environment(haproxy))
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                 logging_level="WARNING", log_to_driver=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield metrics_port
    finally:
        ray.shutdown()


@contextmanager
def serve_apps(apps: list[tuple[str, str, dict[str, Any]]], metrics_port: int) -> Iterator[ServeCluster]:
    """Serve on a free port in the running Ray cluster, with each (name, route_prefix, build_app args) deployed."""
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, prefix, args in apps:
            serve.run(build_app(args), name=name, route_prefix=prefix)
        yield ServeCluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()


@contextmanager
def serve_cluster(apps: list[tuple[str, str, dict[str, Any]]], num_cpus: int = 2,
                  haproxy: bool | None = None) -> Iterator[ServeCluster]:
    """A Ray cluster with Serve and the apps deployed."""
    with ray_cluster(num_cpus, haproxy) as metrics_port, serve_apps(apps, metrics_port) as cluster:
        yield cluster


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


@dataclass
class Head:
    gcs_address: str  # for a driver started by hand (RAY_ADDRESS)
    dashboard_url: str  # for `ray job submit`
    env: dict[str, str]


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[Head]:
    """`ray start --head --block` with the dashboard, in a temp dir of its own (so that `ray.init()` elsewhere on
    this machine never finds it) and its own process group: teardown stops exactly what it started (no `ray stop`,
    which would stop every Ray instance on the machine). Its processes never see this process's later environment:
    a running cluster, as users have one."""
    temp_dir = tempfile.mkdtemp(prefix="rbj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**cluster_environment(), "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port", "--metrics-export-port")}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir,
           *[x for flag, port in ports.items() for x in (flag, str(port))]]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_for(lambda: proc.poll() is not None or _http_ok(f"{url}/api/version"), 90, 0.5, "the Ray dashboard")
        assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
        yield Head(f"127.0.0.1:{ports['--port']}", url, env)
    finally:
        proc.send_signal(signal.SIGINT)  # `ray start --block` stops its Ray processes on the way out ...
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # ... and whatever is left of its process group goes
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
