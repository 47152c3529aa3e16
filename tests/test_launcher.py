"""`python -m deployments.launch` (scripts/run.sh) as a user runs it: it serves, and a Ctrl-C stops everything it
started, so that the port is free for the next start. (The launcher used to kill `serve run` at the first Ctrl-C,
mid-shutdown; once, an HAProxy left behind that way held port 8000 and the next start failed. That race did not
show in this test's runs of the old launcher, so this test guards the outcome, not that race.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serve_harness import VENV_BIN, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ctrl_c_stops_the_service_and_frees_its_port(tiny_untied_model, tmp_path):
    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "llm", "route_prefix": "/", "import_path": "deployments.app:build_app",
                                "args": {"model": tiny_untied_model, "served_model_name": "tiny", "replica_num_cpus": 0,
                                         "max_model_len": 256, "num_kvcache_blocks": 64, "max_num_seqs": 4}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "launch.log", "w")
    # A session of its own, as a terminal's foreground job: the Ctrl-C below reaches the launcher's process group.
    proc = subprocess.Popen([sys.executable, "-m", "deployments.launch", str(path)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 180, 1.0, "the service")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(90)
        deadline = time.monotonic() + 15
        while not _port_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _port_free(port), "something still holds the service's port after Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
