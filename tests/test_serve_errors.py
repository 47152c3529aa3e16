"""Bad input and overload: each bad request gets its status and an OpenAI-style error body, and the service
keeps serving; a full queue is answered 503 by Serve's limits, not queued without bound."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_harness import serve_cluster

MODEL = "tiny"
MAX_MODEL_LEN = 256
BASE = dict(model=None, served_model_name=MODEL, replica_num_cpus=0, max_model_len=MAX_MODEL_LEN,
            max_num_batched_tokens=512, max_request_body_bytes=256 * 1024, max_prompts_per_request=4)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def service(tiny_model):
    main = {**BASE, "model": tiny_model, "num_kvcache_blocks": 128}
    # A second app with one request at a time, one waiting, and a KV pool of 8 blocks (128 tokens).
    tight = {**BASE, "model": tiny_model, "num_kvcache_blocks": 8, "max_ongoing_requests": 1,
             "max_queued_requests": 1}
    with serve_cluster([("llm", "/", main), ("tight", "/tight", tight)]) as cluster:
        yield cluster


def _post(service, path: str, body, prefix: str = "") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{service.http_url}{prefix}/v1/{path}", content=content,
                      headers={"Content-Type": "application/json"}, timeout=60)


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def _still_serving(service) -> None:
    r = _post(service, "completions", {"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


CASES = [
    ("bad JSON", "completions", b'{"prompt": "x", ', 400, None),
    ("not an object", "completions", [1, 2], 400, None),
    ("no prompt", "completions", {"max_tokens": 3}, 400, "prompt"),
    ("wrong type", "completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("max_tokens 0", "completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over the limit", "completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN + 1}, 400, "max_tokens"),
    ("prompt + max_tokens over max_model_len", "completions",
     {"prompt": "hello " * 100, "max_tokens": MAX_MODEL_LEN - 50}, 400, "max_tokens"),
    ("prompt alone over max_model_len", "completions", {"prompt": list(range(MAX_MODEL_LEN))}, 400, "prompt"),
    ("negative temperature", "completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("top_p 0", "completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "completions", {"prompt": []}, 400, "prompt"),
    ("empty prompt in a batch", "completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("token id outside the vocabulary", "completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("too many prompts", "completions", {"prompt": ["a"] * 5}, 400, "prompt"),
    ("too many choices", "completions", {"prompt": ["a", "b"], "n": 3}, 400, "n"),
    ("n 0", "completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("logprobs over 20", "completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("empty stop string", "completions", {"prompt": "a", "stop": [""]}, 400, None),
    ("body over the limit", "completions", {"prompt": "x" * 300_000}, 413, None),
    # values bound for a tensor, and input no tokenizer or parser takes: 400, and the engine goes on
    ("top_k past int64", "completions", {"prompt": "x", "top_k": 10**20}, 400, "top_k"),
    ("top_k past int32", "completions", {"prompt": "x", "top_k": 2**31}, 400, "top_k"),
    ("seed past int64", "completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("stop token outside the vocabulary", "completions", {"prompt": "x", "stop_token_ids": [10**20]}, 400,
     "stop_token_ids"),
    ("temperature NaN", "completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("temperature Infinity", "completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ("top_p NaN", "completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p"),
    ("min_p -Infinity", "completions", b'{"prompt": "x", "min_p": -Infinity}', 400, "min_p"),
    ("lone surrogate in the prompt", "completions", b'{"prompt": "ab\\ud800cd"}', 400, "prompt"),
    ("lone surrogate in a batch", "completions", b'{"prompt": ["ok", "ab\\udfffcd"]}', 400, "prompt"),
    ("JSON nested 2,000 deep", "completions", b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400, None),
    ("JSON nested 100,000 deep", "completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("chat: lone surrogate", "chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400,
     "messages"),
    ("chat: temperature NaN", "chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("chat: no messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("chat: bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("chat: max_tokens 0", "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens"),
    ("chat: negative temperature", "chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("chat: unknown model", "chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(service, name, path, body, status, param):
    _error(_post(service, path, body), status, param)
    if isinstance(body, dict) and status == 400 and "messages" not in body:
        body = {**body, "stream": True}  # a streamed request is refused the same way, before any event
        _error(_post(service, path, body), status, param)


def test_service_keeps_serving_after_bad_input(service):
    _still_serving(service)


def test_openai_client_sees_bad_request(service):
    client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


def test_request_the_kv_cache_cannot_hold(service):
    # 8 blocks of 16 tokens: 200 tokens fit max_model_len but not the cache; the engine refuses, the client gets 400
    r = _post(service, "completions", {"prompt": "hi", "max_tokens": 200}, prefix="/tight")
    assert "KV cache" in _error(r, 400)["message"]


def test_overload_is_answered_503(service):
    body = {"prompt": "load", "max_tokens": 100, "ignore_eos": True, "stream": True}

    def one(_: int) -> tuple[int, str]:
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", f"{service.http_url}/tight/v1/completions", json=body) as r:
                return r.status_code, r.read().decode()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for status, text in results:
        if status == 503:
            assert json.loads(text)["error"]["type"] == "ServiceUnavailableError"
        else:
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in text
    r = _post(service, "completions", {"prompt": "after the storm", "max_tokens": 3}, prefix="/tight")
    assert r.status_code == 200
    _still_serving(service)
