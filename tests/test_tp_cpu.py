"""Tensor parallelism on the CPU: two Ray actor ranks joined by gloo give the same greedy tokens as one rank, when
driven by a compiled Ray graph or by plain remote calls, and through the Serve app with tensor_parallel_size=2."""

from __future__ import annotations

import os
import random
import time

import openai
import pytest
import torch
from conftest import assert_no_leak
from serve_harness import ray_cluster, serve_apps

from nanovllm_ray import LLM, Config, LLMEngine, SamplingParams
from nanovllm_ray.executor.step import StepInput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ENGINE = dict(max_model_len=512, num_kvcache_blocks=256, max_num_batched_tokens=96)  # 96: prefills are chunked
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    first = [[rng.randrange(0, 150000) for _ in range(n)] for n in (1, 7, 16, 33, 150)]
    return first + [p[: len(p) * 3 // 4] + [rng.randrange(0, 150000)] for p in first[2:]]  # shared prefixes


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(num_cpus=2) as metrics_port:
        yield metrics_port


@pytest.fixture(scope="module")
def reference(tiny_untied_model) -> list[list[int]]:
    llm = LLM(tiny_untied_model, **ENGINE)
    return [o.token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("dispatch, async_scheduling", [("compiled", True), ("remote", True), ("compiled", False)])
def test_tp2_gloo_matches_tp1(cluster, tiny_untied_model, reference, dispatch, async_scheduling):
    """Async scheduling: the driver sends step t+1 before it has step t's tokens; rank 0 broadcasts them."""
    from nanovllm_ray.executor.ray_executor import RayExecutor

    config = Config.from_kwargs(tiny_untied_model, tensor_parallel_size=2, async_scheduling=async_scheduling,
                                dispatch=dispatch, **ENGINE)
    executor = RayExecutor(config)
    engine = LLMEngine(config, executor=executor)
    try:
        assert engine.async_scheduling == async_scheduling
        assert executor.num_kv_blocks == ENGINE["num_kvcache_blocks"]
        assert _run(engine, _prompts()) == reference
        assert engine.stats().prefix_cache_hits > 0
        assert_no_leak(engine)
        # The executor's own cost per step (a no-op sent to both ranks and back), for the log.
        print(f"\n{dispatch} dispatch to 2 ranks: {executor.measure_dispatch(100) * 1e6:.0f} us per step")
    finally:
        engine.shutdown()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_idle_cpu_ranks_do_not_spin(cluster, tiny_untied_model):
    """dispatch=auto drives CPU ranks by actor calls: a compiled graph's rank waits in a sched_yield loop, a core
    each (measured 0.98 of a core per idle rank on the 2-core machine, which starved everything else on it)."""
    import ray

    from nanovllm_ray.executor.ray_executor import RayExecutor

    executor = RayExecutor(Config.from_kwargs(tiny_untied_model, tensor_parallel_size=2, **ENGINE))
    try:
        assert executor.dispatch == "remote"
        executor.measure_dispatch(20, warmup=5)
        pids = ray.get([w.__ray_call__.remote(lambda self: os.getpid()) for w in executor.workers])
        before, t = [_cpu_seconds(p) for p in pids], time.monotonic()
        time.sleep(2.0)
        busy = [(_cpu_seconds(p) - b) / (time.monotonic() - t) for p, b in zip(pids, before)]
        assert max(busy) < 0.25, f"idle ranks used {busy} of a core each"
    finally:
        executor.shutdown()


def test_serve_app_with_tp2(cluster, tiny_untied_model):
    args = dict(model=tiny_untied_model, served_model_name="tiny", tensor_parallel_size=2, worker_num_cpus=1,
                **ENGINE)
    prompts = ["tensor parallel on the CPU", "gloo all-reduce, two ranks, one bundle each"]
    llm = LLM(tiny_untied_model, **ENGINE)
    refs = [o.text for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with serve_apps([("tp", "/", args)], cluster) as service:
        client = openai.OpenAI(base_url=f"{service.http_url}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == refs
        stats = service.llm_stats("tp")
        assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_offline_llm_with_tp2(cluster, tiny_untied_model, reference):
    """LLM(..., tensor_parallel_size=2) drives its ranks as Ray actors without being told."""
    llm = LLM(tiny_untied_model, tensor_parallel_size=2, **ENGINE)
    try:
        assert type(llm.engine.executor).__name__ == "RayExecutor"
        assert [o.token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)] == reference
        assert_no_leak(llm.engine)
    finally:
        llm.engine.shutdown()


def _forward_positions(forward_logits, streams: list[list[int]], prompt_lens: list[int], bs: int) -> torch.Tensor:
    """Logits of every stream, teacher forced: one prefill step of the prompts, then decode steps of the streams'
    own next tokens. Sequence i owns blocks [i * width, (i + 1) * width)."""
    width = (max(map(len, streams)) + bs - 1) // bs
    tables = [list(range(i * width, (i + 1) * width)) for i in range(len(streams))]

    def step(chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        pos = [list(range(s, s + len(c))) for c, s in zip(chunks, starts)]
        slots = [t[q // bs] * bs + q % bs for t, ps in zip(tables, pos) for q in ps]
        ends = [s + len(c) for c, s in zip(chunks, starts)]
        return forward_logits(StepInput(sum(chunks, []), sum(pos, []), slots, list(map(len, chunks)), ends, tables,
                                        [], [], [], [], [], [], None))

    rows = [step([s[:p] for s, p in zip(streams, prompt_lens)], [0] * len(streams))]
    for t in range(len(streams[0]) - prompt_lens[0]):
        rows.append(step([[s[p + t]] for s, p in zip(streams, prompt_lens)], [p + t for p in prompt_lens]))
    return torch.cat(rows)


def test_tp2_forward_logits_match_tp1(cluster, tiny_untied_model):
    """The teacher-forced hook of the GPU tests: every rank runs the step, rank 0's logits come back (fp32, gloo)."""
    import ray

    rng = random.Random(2)
    prompt_lens = [40, 17, 5]
    streams = [[rng.randrange(0, 150000) for _ in range(p + 6)] for p in prompt_lens]
    one = LLM(tiny_untied_model, **ENGINE)
    want = _forward_positions(one.engine.executor.runner.forward_logits, streams, prompt_lens, one.config.block_size)
    two = LLM(tiny_untied_model, tensor_parallel_size=2, **ENGINE)
    try:
        executor = two.engine.executor
        assert ray.get([w.__ray_call__.remote(lambda w: str(w.runner.dtype)) for w in executor.workers]) == [
            "torch.float32"] * 2
        got = _forward_positions(executor.forward_logits, streams, prompt_lens, two.config.block_size)
        assert_no_leak(two.engine)
    finally:
        two.engine.shutdown()
    assert got.shape == (sum(prompt_lens) + 3 * 6, want.shape[1])
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
