"""Greedy tokens identical to transformers' Qwen3ForCausalLM on the same fp32 checkpoint, through every path
the scheduler can take: fresh prefill, prefix-cache hits, chunked prefill, preemption."""

import random

import pytest
import torch
from conftest import assert_no_leak

from nanovllm_ray import LLM, SamplingParams

NEW_TOKENS = 32
LENGTHS = [1, 5, 16, 17, 40, 100, 250, 333]  # 1 to 300+ tokens, block-aligned and not


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 150000) for _ in range(n)] for n in LENGTHS]


def _shared_prefix_prompts(base: list[list[int]]) -> list[list[int]]:
    """A second batch: each prompt keeps most of a first-batch prompt and changes its tail."""
    rng = random.Random(1)
    out = []
    for p in base:
        keep = max(1, len(p) * 3 // 4)
        out.append(p[:keep] + [rng.randrange(0, 150000) for _ in range(rng.randrange(1, 20))])
    return out


def _hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    return refs


@pytest.fixture(scope="module", params=["tiny_model", "tiny_untied_model"])
def case(request):
    path = request.getfixturevalue(request.param)
    first = _prompts(0)
    second = _shared_prefix_prompts(first)
    return path, first, second, _hf_greedy(path, first), _hf_greedy(path, second)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts):
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(o.finish_reason == "length" and o.num_generated_tokens == NEW_TOKENS for o in outs)
    return outs


def test_fresh_then_shared_prefix(case):
    path, first, second, ref1, ref2 = case
    llm = LLM(path, num_kvcache_blocks=512, max_model_len=1024)
    outs = _generate(llm, first)
    assert [o.token_ids for o in outs] == ref1
    assert all(o.num_cached_tokens == 0 for o in outs)
    outs = _generate(llm, second)
    assert [o.token_ids for o in outs] == ref2
    cached = [o.num_cached_tokens for o in outs]
    assert sum(cached) > 0
    for o, p in zip(outs, second):
        assert o.num_cached_tokens % llm.config.block_size == 0 and o.num_cached_tokens < len(p)
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_chunked_prefill(case, async_scheduling):
    path, first, _, ref1, _ = case
    llm = LLM(path, num_kvcache_blocks=512, max_model_len=1024, max_num_batched_tokens=64,
              async_scheduling=async_scheduling)
    assert [o.token_ids for o in _generate(llm, first)] == ref1
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("policy, async_scheduling", [("mixed", True), ("mixed", False), ("prefill_first", True)])
def test_preemption(case, policy, async_scheduling):
    path, first, _, ref1, _ = case
    # 48 blocks of 16 = 768 tokens, while the batch needs about 1,260: requests must be preempted and resumed.
    llm = LLM(path, num_kvcache_blocks=48, max_model_len=1024, max_num_batched_tokens=512,
              scheduling_policy=policy, async_scheduling=async_scheduling)
    assert [o.token_ids for o in _generate(llm, first)] == ref1
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leak(llm.engine)


def test_prefix_caching_off_gives_same_tokens(case):
    path, _, second, _, ref2 = case
    llm = LLM(path, num_kvcache_blocks=512, max_model_len=1024, enable_prefix_caching=False, block_size=32)
    outs = _generate(llm, second)
    assert [o.token_ids for o in outs] == ref2
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("block_size", [16, 256])
def test_warmup_steps_cover_the_compiled_shapes_and_leave_no_trace(tiny_model, block_size):
    """The start-up steps (run on CUDA only, before any request: they write into blocks that are free) include a chunk
    over a cached prefix beside a plain prefill and token counts odd, even and a multiple of 16; run here on the CPU,
    they change nothing that serving sees."""
    prompts = [[random.Random(i).randrange(0, 150000) for _ in range(n)] for i, n in enumerate((5, 40, 300))]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = []
    for warm in (False, True):
        llm = LLM(tiny_model, max_model_len=512, block_size=block_size)
        runner = llm.engine.executor.runner
        if warm:
            steps = runner.warmup_steps()
            assert any(q < s for step in steps for q, s in zip(step.query_lens, step.seq_lens))  # a cached prefix
            assert {len(s.input_ids) % 2 for s in steps} == {0, 1}
            assert any(len(s.input_ids) % 16 == 0 for s in steps)
            for step in steps:
                assert max(b for t in step.block_tables for b in t) < runner.num_kv_blocks
                assert len(runner.execute(step).token_ids) == len(step.sample_rows)
        got.append([o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        assert_no_leak(llm.engine)
    assert got[0] == got[1]
