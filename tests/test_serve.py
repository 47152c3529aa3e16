"""The OpenAI service on a real Ray cluster, driven by the `openai` client: completions and chat, streamed and
not, the same greedy text as the offline engine (also under 32 concurrent requests), the API key, a client that
disconnects mid-stream, and the engine metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_harness import serve_cluster, wait_for

from nanovllm_ray import LLM, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 1024
ENGINE = dict(max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=512, max_num_seqs=64, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def service(tiny_untied_model):
    args = dict(model=tiny_untied_model, served_model_name=MODEL, api_key=API_KEY, replica_num_cpus=0,
                max_ongoing_requests=64, max_queued_requests=128, **ENGINE)
    with serve_cluster([("llm", "/", args)]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def offline(tiny_untied_model) -> LLM:
    return LLM(tiny_untied_model, **ENGINE)


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["paged", "attention", "block", "cache", "token", "Ray", "serve", "GPU", "kernel", "prefix", "the", "a",
             "fast", "small", "engine", "über", "日本", "🙂", "42", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _chat_text(offline: LLM, messages: list[dict]) -> str:
    return offline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_models_and_health(service, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{service.http_url}/health").status_code == 200  # no key needed


def test_completion_matches_offline(client, offline):
    prompt = _words(0, 30)
    ref = offline.generate(prompt, _greedy(24), use_tqdm=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.num_prompt_tokens and r.usage.completion_tokens == 24
    # the same prompt again: its full blocks come from the prefix cache
    r2 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == ref.text
    bs = 16
    assert r2.usage.prompt_tokens_details.cached_tokens == (ref.num_prompt_tokens - 1) // bs * bs > 0


def test_completion_stream_matches_offline(client, offline):
    prompt = _words(1, 40)
    ref = offline.generate(prompt, _greedy(20), use_tqdm=False)[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_token_id_prompts_batch_n_and_logprobs(client, offline):
    ids = [[random.Random(i).randrange(0, 150000) for _ in range(10 + 7 * i)] for i in range(3)]
    refs = offline.generate(ids, _greedy(8), use_tqdm=False)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, n=2, logprobs=3,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        ref = refs[c.index // 2]
        assert c.text == ref.text
        assert c.model_extra["token_ids"] == ref.token_ids
        assert len(c.logprobs.tokens) == 8 and len(c.logprobs.top_logprobs[0]) <= 3
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert r.usage.prompt_tokens == sum(len(p) for p in ids)
    assert r.usage.completion_tokens == 6 * 8


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt=_words(2, 12), max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_the_ingress_adds_requests_itself_once_it_knows_the_engine_core(service, client, offline):
    """The fast path: once a call has told the ingress where the engine core is, the ingress sends a request's add
    to the core itself and the LLMServer's call (pinned to that replica) follows it; the tokens are the same."""
    before = service.llm_stats("llm")["num_adopted"]
    prompt = _words(9, 12)
    ref = offline.generate(prompt, _greedy(10), use_tqdm=False)[0]
    for _ in range(3):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.text
    assert service.llm_stats("llm")["num_adopted"] >= before + 2


def test_chat_matches_offline(client, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": _words(3, 20)}]
    ref = offline.generate(_chat_text(offline, messages), _greedy(16), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == ref.num_prompt_tokens and r.usage.completion_tokens == 16

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.content == ref.text[:len(c.message.content)]
        assert len(c.logprobs.content) == 4 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        assert c.logprobs.content[0].top_logprobs[0].logprob >= c.logprobs.content[0].top_logprobs[1].logprob


def test_stop_string(client, offline):
    prompt = _words(4, 25)
    full = offline.generate(prompt, _greedy(30), use_tqdm=False)[0].text
    stop = full[10:13]
    assert stop.strip()
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_64_concurrent_streams_match_offline_and_the_unstreamed_text(client, offline):
    """64 streams at once (every engine step then carries many requests' tokens to the ingress in one message):
    each gets LLM.generate's greedy token ids and text; with stop strings too, and the chunks of each stream
    concatenate to exactly what the same request answers unstreamed."""
    n = 64
    prompts = [_words(100 + i, 5 + i % 23) for i in range(n)]
    lengths = [8 + (7 * i) % 33 for i in range(n)]
    refs = offline.generate(prompts, [_greedy(m) for m in lengths], use_tqdm=False)
    stops = [[ref.text[4:7]] if i % 4 == 0 and ref.text[4:7].strip() else None for i, ref in enumerate(refs)]

    def kw(i: int) -> dict:
        return dict(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stop=stops[i],
                    extra_body={"ignore_eos": True, "return_token_ids": True})

    def streamed(i: int) -> tuple[str, list[int], str]:
        text, ids, reason = "", [], None
        for c in client.completions.create(stream=True, **kw(i)):
            if c.choices:
                text += c.choices[0].text
                ids += c.choices[0].model_extra.get("token_ids") or []
                reason = c.choices[0].finish_reason or reason
        return text, ids, reason

    with ThreadPoolExecutor(n) as pool:
        streams = list(pool.map(streamed, range(n)))
        whole = list(pool.map(lambda i: client.completions.create(**kw(i)).choices[0], range(n)))
    for i, ((text, ids, reason), ref, full) in enumerate(zip(streams, refs, whole)):
        assert text == full.text, i
        if stops[i] is None:
            assert ids == ref.token_ids and text == ref.text and reason == "length", i
        else:  # cut before the stop string; the tokens end with the one that completed it
            assert text == ref.text[:ref.text.index(stops[i][0])] and reason == "stop", i
            assert ids == ref.token_ids[:len(ids)] and 0 < len(ids) <= len(ref.token_ids), i


def test_api_key_is_enforced(service):
    url = f"{service.http_url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "AuthenticationError"
    r = httpx.post(f"{service.http_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401
    bad = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_disconnected_stream_frees_its_blocks(service):
    before = service.llm_stats("llm")
    body = {"model": MODEL, "prompt": _words(5, 50), "max_tokens": 900, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{service.http_url}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk read; leaving the block closes the connection mid-stream
    stats = wait_for(lambda: (s := service.llm_stats("llm"))["num_aborted"] > before["num_aborted"]
                     and s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_blocks"]
                     and s, timeout_s=30, what="the aborted request to free its blocks")
    assert stats["num_requests"] == before["num_requests"] + 1


def test_metrics_on_prometheus_endpoint(service, client):
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=4, temperature=0)
    names = ["nanovllm_requests_total", "nanovllm_time_to_first_token_seconds_bucket",
             "nanovllm_time_per_output_token_seconds_bucket", "nanovllm_num_requests_running",
             "nanovllm_num_requests_waiting", "nanovllm_kv_cache_usage_ratio", "nanovllm_prefix_cache_hit_rate"]

    def scrape():
        try:
            text = httpx.get(service.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return None
        missing = [n for n in names if n not in text]
        return text if not missing else None

    text = wait_for(scrape, timeout_s=60, interval_s=2, what=f"{names} on {service.metrics_url}")
    line = next(ln for ln in text.splitlines() if ln.startswith("ray_nanovllm_requests_total{"))
    assert f'model="{MODEL}"' in line and float(line.rsplit(" ", 1)[1]) >= 1
