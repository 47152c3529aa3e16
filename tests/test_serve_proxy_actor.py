"""The service with HTTP through Serve's proxy actor (RAY_SERVE_ENABLE_HA_PROXY=0), the way a plain `serve run`
on a cluster started without HAProxy serves it; the other serve tests run behind Serve's HAProxy ingress, as
`deployments.launch` sets it up. The same requests answer the same way on both paths."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_harness import serve_cluster

from nanovllm_ray import LLM, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ENGINE = dict(max_model_len=512, num_kvcache_blocks=256, max_num_seqs=16, max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def service(tiny_untied_model):
    args = dict(model=tiny_untied_model, served_model_name="tiny", replica_num_cpus=0, **ENGINE)
    with serve_cluster([("llm", "/", args)], haproxy=False) as cluster:
        yield cluster


def test_streamed_and_whole_answers_match_the_engine_through_the_proxy_actor(service, tiny_untied_model):
    prompt = "paged attention on a small engine"
    ref = LLM(tiny_untied_model, **ENGINE).generate(prompt, SamplingParams(temperature=0, max_tokens=12,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(f"{service.http_url}/v1/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["text"] == ref.text
    text = ""
    with httpx.stream("POST", f"{service.http_url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == ref.text


def test_bad_input_gets_an_openai_error_through_the_proxy_actor(service):
    r = httpx.post(f"{service.http_url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1},
                   timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert httpx.get(f"{service.http_url}/health", timeout=30).status_code == 200
