"""Fault injection on a running Ray cluster (`ray start --head`, CPU, tiny model): what a client sees when a part
dies or a request is hostile. Each case checks the status and body a client gets, that nothing hangs past a
bound, how many requests are lost (only those in flight on the dead part), and how long until the service serves
again. The app is deployed by `python -m deployments.launch` with NANOVLLM_API_KEY in the launcher's environment
only, as a user of a running cluster would; so the first case is that the key is enforced there.

The measurements print as a table at the end (pytest -s); with NANOVLLM_FAULTS_JSON=PATH they are also written to
PATH (the README's table comes from such a run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from serve_harness import free_port, ray_head, wait_for

from deployments.router_actor import ROUTER_NAMESPACE, router_actor_name
from nanovllm_ray.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parent.parent
KEY = "fault-suite-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE = dict(max_model_len=1024, num_kvcache_blocks=512, max_num_seqs=16, max_num_batched_tokens=1024)
RESULTS: list[dict] = []
BOUND_S = 20.0  # no client waits longer than this for an answer, whatever failed


def _app(name: str, model: str, **args) -> dict:
    return {"name": name, "route_prefix": f"/{name}", "import_path": "deployments.app:build_app",
            "args": {"model": model, "served_model_name": "tiny", "replica_num_cpus": 0, **ENGINE, **args}}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}, "applications": [
        _app("one", tiny_model),
        _app("two", tiny_model, num_replicas=2, prefix_routing={"heartbeat_period_s": 0.2}),
        _app("tp", tiny_model, tensor_parallel_size=2, worker_num_cpus=0.1, max_num_seqs=8),
        _app("tight", tiny_model, max_ongoing_requests=1, max_queued_requests=1),
        _app("needs-key", tiny_model, api_key="env:NANOVLLM_FAULT_SUITE_ABSENT"),
    ]}
    path = tmp_path_factory.mktemp("faults") / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    with ray_head(num_cpus=4) as head:
        env = {**head.env, "NANOVLLM_API_KEY": KEY}  # the launcher's shell has the key; the cluster does not
        proc = subprocess.run([sys.executable, "-m", "deployments.launch", str(path), "--non-blocking", "--address",
                               head.gcs_address], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not list(path.parent.glob(".launch-*")), "the launcher's copy of the config (with the key) is gone"
        ray.init(address=head.gcs_address, logging_level="WARNING", log_to_driver=False)
        try:
            from ray import serve

            def up():
                apps = serve.status().applications
                return all(apps.get(a) and apps[a].status == "RUNNING" for a in ("one", "two", "tp", "tight"))

            wait_for(up, 240, 1.0, "the applications to run")
            yield {"url": f"http://127.0.0.1:{port}", "head": head}
        finally:
            _report()
            ray.shutdown()


def _report() -> None:
    if not RESULTS:
        return
    keys = ["case", "client_sees", "within_bound", "lost", "serving_again_s"]
    print("\n" + " | ".join(keys))
    for r in RESULTS:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    if os.environ.get("NANOVLLM_FAULTS_JSON"):
        Path(os.environ["NANOVLLM_FAULTS_JSON"]).write_text(json.dumps(RESULTS, indent=2))


def _post(url: str, path: str, body, timeout: float = BOUND_S) -> tuple[int, dict | str, float]:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    t = time.monotonic()
    r = httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=timeout)
    try:
        data = r.json()
    except ValueError:
        data = r.text
    return r.status_code, data, time.monotonic() - t


class _Stream(threading.Thread):
    """A streamed completion in the background: its first token, its events, how it ended."""

    def __init__(self, url: str, app: str, max_tokens: int = 900, prompt: str = "a long story") -> None:
        super().__init__(daemon=True)
        self.url, self.app, self.max_tokens, self.prompt = url, app, max_tokens, prompt
        self.first = threading.Event()
        self.status: int | None = None
        self.error: dict | None = None
        self.done_at: float | None = None
        self.tokens = 0

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        try:
            with httpx.stream("POST", f"{self.url}/{self.app}/v1/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        self.error = msg["error"]
                    for c in msg.get("choices") or ():
                        self.tokens += len(c.get("token_ids") or ())
                        self.first.set()
        except httpx.HTTPError as e:
            self.error = {"message": f"connection: {type(e).__name__}: {e}"}
        finally:
            self.done_at = time.monotonic()
            self.first.set()


def _serving_again(url: str, app: str, since: float, bound_s: float = 120.0) -> float:
    """Seconds from `since` until a completion on `app` succeeds."""
    def ok():
        try:
            return _post(url, f"/{app}/v1/completions", {"prompt": "again", "max_tokens": 2})[0] == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, bound_s, 0.25, f"{app} to serve again")
    return round(time.monotonic() - since, 1)


# ---- the cases -----------------------------------------------------------------------------------------------


def test_api_key_set_in_the_launchers_shell_is_enforced_on_a_running_cluster(cluster):
    url = cluster["url"]
    assert httpx.get(f"{url}/one/v1/models", timeout=10).status_code == 401
    r = httpx.post(f"{url}/one/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/one/v1/models", headers=AUTH, timeout=10).status_code == 200
    RESULTS.append({"case": "API key only in the launching shell, running cluster", "client_sees":
                    "401 invalid_api_key without the key, 200 with it", "within_bound": True, "lost": 0,
                    "serving_again_s": 0})


def test_a_key_asked_for_but_missing_refuses_the_deploy(cluster):
    from ray import serve

    # Serve retries a failing constructor a few times before it gives up; the other apps may be up sooner.
    wait_for(lambda: serve.status().applications["needs-key"].status != "DEPLOYING", 120, 0.5,
             "the needs-key app to stop deploying")
    app = serve.status().applications["needs-key"]
    assert app.status == "DEPLOY_FAILED"
    assert "NANOVLLM_FAULT_SUITE_ABSENT is not set where the application is built" in app.message
    RESULTS.append({"case": "api_key: env:NAME, NAME unset where the app is built", "client_sees":
                    "the deploy fails (DEPLOY_FAILED, naming the variable); nothing served open",
                    "within_bound": True, "lost": 0, "serving_again_s": ""})


@pytest.mark.parametrize("name, body", [
    ("top_k 1e20", {"prompt": "x", "max_tokens": 2, "top_k": 10**20}),
    ("seed 2^70", {"prompt": "x", "max_tokens": 2, "seed": 2**70}),
    ("temperature NaN", b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}'),
    ("lone surrogate", b'{"prompt": "ab\\ud800cd", "max_tokens": 2}'),
    ("JSON 100,000 deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
])
def test_poison_request_gets_400_and_the_engine_goes_on(cluster, name, body):
    url = cluster["url"]
    status, data, seconds = _post(url, "/one/v1/completions", body)
    assert status == 400 and data["error"]["type"] == "BadRequestError", data
    assert seconds < 5
    after, _, _ = _post(url, "/one/v1/completions", {"prompt": "next", "max_tokens": 2})
    assert after == 200
    RESULTS.append({"case": f"poison request: {name}",
                    "client_sees": f"400 in {seconds:.2f} s: {data['error']['message'][:60]}...",
                    "within_bound": seconds < 5, "lost": 0, "serving_again_s": 0})


def test_overload_past_max_queued_requests(cluster):
    url = cluster["url"]
    streams = [_Stream(url, "tight", max_tokens=100, prompt=f"storm {i}") for i in range(8)]
    t = time.monotonic()
    for s in streams:
        s.start()
    for s in streams:
        s.join(BOUND_S + 60)
    refused = [s for s in streams if s.status == 503]
    served = [s for s in streams if s.status == 200 and s.error is None and s.tokens == 100]
    assert refused and served and len(refused) + len(served) == len(streams), [(s.status, s.error) for s in streams]
    slowest_refusal = max(s.done_at - t for s in refused)
    assert slowest_refusal < BOUND_S  # (0.2-0.4 s measured on the 2-core CI machine, 2026-11-30)
    RESULTS.append({"case": "8 streams at once past max_ongoing 1 + max_queued 1",
                    "client_sees": f"{len(refused)} x 503 within {slowest_refusal:.1f} s, {len(served)} served",
                    "within_bound": True, "lost": 0, "serving_again_s": 0})


def test_engine_core_death_fails_its_requests_with_503_and_the_replica_is_replaced(cluster):
    from ray import serve

    url = cluster["url"]
    stream = _Stream(url, "one")
    stream.start()
    assert stream.first.wait(60) and stream.error is None
    # the engine core of app "one": its LLMServer says where a subscriber reads (a CoreRef)
    handle = serve.get_deployment_handle("LLMServer", app_name="one")
    gen = handle.generate.options(stream=True).remote([1, 2, 3], SamplingParams(max_tokens=1), "probe", "probe")
    core = next(iter(gen))
    gen.cancel()
    killed = time.monotonic()
    ray.kill(core.actor)
    stream.join(BOUND_S)
    assert not stream.is_alive(), "the stream hung after its engine died"
    assert stream.error is not None and "engine" in stream.error["message"], stream.error
    failed_after = round(stream.done_at - killed, 2)
    # /health tells the truth while no replica has a live engine: 503 with an OpenAI body, within its 2 s
    t = time.monotonic()
    health = httpx.get(f"{url}/one/health", timeout=10)
    health_s = time.monotonic() - t
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable", health.text
    assert health_s < 5
    # a request meanwhile: a 503 or, once replaced, a 200 — never a hang
    status, data, seconds = _post(url, "/one/v1/completions", {"prompt": "meanwhile", "max_tokens": 2})
    assert status in (200, 503) and seconds < BOUND_S, (status, data)
    again = _serving_again(url, "one", killed)
    assert httpx.get(f"{url}/one/health", timeout=10).status_code == 200
    RESULTS.append({"case": "engine core actor killed mid-stream (1 replica)",
                    "client_sees": f"error event {stream.error.get('code')} after {failed_after} s; "
                                   f"/health 503 in {health_s:.1f} s; a new request: {status} in {seconds:.1f} s",
                    "within_bound": failed_after < BOUND_S, "lost": 1, "serving_again_s": again})


def test_rank_actor_death_mid_stream(cluster):
    from ray.util.state import list_actors

    url = cluster["url"]
    stream = _Stream(url, "tp")
    stream.start()
    assert stream.first.wait(60) and stream.error is None
    ranks = list_actors(address=cluster["head"].dashboard_url,
                        filters=[("class_name", "=", "TPWorker"), ("state", "=", "ALIVE")])
    assert len(ranks) == 2
    killed = time.monotonic()
    os.kill(ranks[1].pid, signal.SIGKILL)  # a crash of rank 1's process
    stream.join(BOUND_S)
    assert not stream.is_alive(), "the stream hung after a rank died"
    assert stream.error is not None, "the stream ended without an error"
    failed_after = round(stream.done_at - killed, 2)
    again = _serving_again(url, "tp", killed, bound_s=180)
    RESULTS.append({"case": "tensor-parallel rank actor killed mid-stream (tp=2, gloo)",
                    "client_sees": f"error event {stream.error.get('code')} after {failed_after} s",
                    "within_bound": failed_after < BOUND_S, "lost": 1, "serving_again_s": again})


def test_llm_server_replica_killed_under_load(cluster):
    from ray.serve._private.common import DeploymentID
    from ray.serve.request_router import ReplicaID
    from ray.util.state import list_actors

    url = cluster["url"]
    streams = [_Stream(url, "two", max_tokens=300, prompt=f"load {i}") for i in range(8)]
    for s in streams:
        s.start()
    assert all(s.first.wait(60) for s in streams)
    replicas = list_actors(address=cluster["head"].dashboard_url,
                           filters=[("class_name", "=", "ServeReplica:two:LLMServer"), ("state", "=", "ALIVE")])
    assert len(replicas) == 2
    # the victim: the replica running the most of the streams, as the load reports say
    router = ray.get_actor(router_actor_name("two"), namespace=ROUTER_NAMESPACE)
    running = wait_for(lambda: (r := {uid: v["load"]["num_running"] for uid, v in
                                      ray.get(router.stats.remote())["replicas"].items()}) and max(r.values()) > 0
                       and r, 30, 0.1, "the replicas' load reports")
    uid = max(running, key=running.get)
    full_id = ReplicaID(uid, DeploymentID(name="LLMServer", app_name="two")).to_full_id_str()
    (victim,) = [a for a in replicas if a.name == full_id]
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)  # a crash of one replica's process (its engine core goes with it)
    again = _serving_again(url, "two", killed)  # a new request, at once: the other replica takes it
    for s in streams:
        s.join(BOUND_S + 60)
        assert not s.is_alive()
    lost = sum(s.error is not None for s in streams)
    assert lost >= 1, ([s.error for s in streams], running)  # those on the dead replica ...
    assert all(s.tokens == 300 for s in streams if s.error is None)  # ... and the others complete
    statuses = [_post(url, "/two/v1/completions", {"prompt": f"after {i}", "max_tokens": 2})[0] for i in range(6)]
    assert statuses.count(200) == 6, statuses
    RESULTS.append({"case": "LLMServer replica killed, 8 streams on 2 replicas",
                    "client_sees": f"the {lost} streams on it end with an error event, the {8 - lost} others complete; "
                                   "new requests 200",
                    "within_bound": True, "lost": lost, "serving_again_s": again})


def test_router_actor_killed(cluster):
    url = cluster["url"]
    actor = ray.get_actor(router_actor_name("two"), namespace=ROUTER_NAMESPACE)
    killed = time.monotonic()
    ray.kill(actor)
    statuses = [_post(url, "/two/v1/completions", {"prompt": f"routed {i}", "max_tokens": 2}) for i in range(6)]
    assert all(s == 200 for s, _, _ in statuses), statuses
    slowest = max(t for _, _, t in statuses)
    assert slowest < BOUND_S
    assert time.monotonic() - killed < BOUND_S * 6
    RESULTS.append({"case": "prefix router actor killed", "client_sees": f"6 requests right after: 200, the slowest "
                    f"in {slowest:.2f} s (routing goes on from the ingress's copy of the index; the actor restarts "
                    "empty and refills)", "within_bound": True, "lost": 0, "serving_again_s": 0})


# ---- the API key's way from the launching shell (no cluster) ---------------------------------------------------


def test_launcher_folds_the_key_into_nanovllm_apps_only():
    from deployments.launch import fold_api_key

    config = {"applications": [
        {"name": "a", "import_path": "deployments.app:build_app", "args": {"model": "m"}},
        {"name": "b", "import_path": "deployments.app:build_app", "args": {"api_key": "own"}},
        {"name": "c", "import_path": "deployments.app:build_app"},
        {"name": "other", "import_path": "somebody.else:app", "args": {}},
    ]}
    assert fold_api_key(config, "k") == 2
    assert [a.get("args", {}).get("api_key") for a in config["applications"]] == ["k", "own", "k", None]


def test_launcher_sends_http_through_haproxy_unless_told_otherwise(monkeypatch):
    import deployments.launch as launch

    monkeypatch.setattr(launch, "haproxy_available", lambda: True)
    env = launch.serve_environment({"PATH": "/bin"})
    assert env[launch.HAPROXY_ENV] == "1" and env[launch.DRAIN_ENV] == "2" and env["PATH"] == "/bin"
    assert launch.serve_environment({launch.HAPROXY_ENV: "1", launch.DRAIN_ENV: "7"})[launch.DRAIN_ENV] == "7"
    assert launch.serve_environment({launch.HAPROXY_ENV: "0"}) == {launch.HAPROXY_ENV: "0"}  # Serve's proxy actor
    monkeypatch.setattr(launch, "haproxy_available", lambda: False)
    assert launch.HAPROXY_ENV not in launch.serve_environment({})


def test_api_key_values(monkeypatch):
    from deployments.app import resolve_api_key

    monkeypatch.delenv("NANOVLLM_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("NANOVLLM_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("literal") == "literal"
    monkeypatch.setenv("MY_KEY", "mine")
    assert resolve_api_key("env:MY_KEY") == "mine"
    with pytest.raises(ValueError, match="the environment variable NOPE_KEY is not set where the application is"):
        resolve_api_key("env:NOPE_KEY")
    with pytest.raises(ValueError, match="api_key is empty"):
        resolve_api_key("")
