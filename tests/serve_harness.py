"""A real Ray cluster with Serve for one test module: started once, torn down at the module's end."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeCluster:
    http_url: str  # http://127.0.0.1:PORT
    metrics_url: str  # Ray's Prometheus endpoint on this node

    def llm_handle(self, app: str):
        from ray import serve

        return serve.get_deployment_handle("LLMServer", app_name=app)

    def llm_stats(self, app: str) -> dict[str, Any]:
        return self.llm_handle(app).stats.remote().result(timeout_s=30)


@contextmanager
def ray_cluster(num_cpus: int = 2) -> Iterator[int]:
    """ray.init for one module; yields the metrics export port."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token
    if ray.is_initialized():
        ray.shutdown()
    metrics_port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
             logging_level="WARNING", log_to_driver=False)
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
def serve_cluster(apps: list[tuple[str, str, dict[str, Any]]], num_cpus: int = 2) -> Iterator[ServeCluster]:
    """A Ray cluster with Serve and the apps deployed."""
    with ray_cluster(num_cpus) as metrics_port, serve_apps(apps, metrics_port) as cluster:
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
