"""The engine loads Hugging Face checkpoints split over several safetensors files and stored in bf16/fp16."""

import pytest
import torch
from conftest import decisive as is_decisive

from nanovllm_ray import LLM, SamplingParams
from nanovllm_ray.demo_model import make_demo_checkpoint
from nanovllm_ray.executor.step import StepInput

PROMPTS = [[11, 22, 33, 44, 55] * 5, list(range(500, 540))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_untied_model):
    return [o.token_ids for o in LLM(tiny_untied_model, num_kvcache_blocks=64).generate(PROMPTS, GREEDY,
                                                                                         use_tqdm=False)]


def test_sharded_checkpoint(tmp_path, reference):
    path = make_demo_checkpoint(tmp_path / "sharded", "tiny-untied", num_shards=3)
    assert len(list(path.glob("*.safetensors"))) == 3 and (path / "model.safetensors.index.json").exists()
    llm = LLM(str(path), num_kvcache_blocks=64)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoint(tmp_path, stored):
    path = make_demo_checkpoint(tmp_path / stored, "tiny", dtype=stored)
    auto = LLM(str(path), num_kvcache_blocks=64)
    runner = auto.engine.executor.runner
    assert runner.dtype == torch.float32  # auto on the CPU computes in fp32
    assert runner.model.model.embed_tokens.weight.dtype == torch.float32
    half = LLM(str(path), num_kvcache_blocks=64, dtype=stored)
    assert half.engine.executor.runner.model.model.embed_tokens.weight.dtype == getattr(torch, stored)
    a = auto.generate(PROMPTS, GREEDY, use_tqdm=False)
    b = half.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(o.num_generated_tokens == 12 for o in a + b)
    # Teacher-forced on fp32's own tokens, half precision picks fp32's token wherever fp32's top two logits are
    # further apart than half-precision noise. (Random weights leave near-ties elsewhere, and a greedy run that flips
    # one goes its own way from there, so comparing the two runs' tokens measures the first flip's place.)
    streams = [p + o.token_ids for p, o in zip(PROMPTS, a)]
    truth, got = _logits(auto, streams), _logits(half, streams)
    decisive = is_decisive(truth)
    assert decisive.sum() >= 10
    assert (got.argmax(-1) == truth.argmax(-1))[decisive].float().mean() >= 0.99


def _logits(llm: LLM, streams: list[list[int]]) -> torch.Tensor:
    """The logits at every position of each stream, from one prefill step (fp32)."""
    bs = llm.config.block_size
    blocks = -(-max(map(len, streams)) // bs)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(len(streams))]
    step = StepInput.forward_only(streams, [0] * len(streams), tables, bs)
    return llm.engine.executor.runner.forward_logits(step).float()


def test_start_up_says_what_it_is_doing_and_times_each_stage(tiny_model, caplog):
    with caplog.at_level("INFO", logger="nanovllm_ray.startup"):
        llm = LLM(tiny_model, num_kvcache_blocks=64)
    stages = llm.engine.executor.runner.clock.stages
    assert list(stages) == ["model built", "weights loaded", "KV cache sized"]  # CPU: no warm-up, no graphs
    assert all(t >= 0 for t in stages.values()) and 0 < sum(stages.values()) <= llm.startup_s
    lines = [r.getMessage() for r in caplog.records if r.name == "nanovllm_ray.startup"]
    assert lines[0].startswith("start-up: model built (cpu, torch.float32)")
    assert "start-up: KV cache sized (64 blocks)" in lines[2] and lines[-1].startswith("start-up: ready in")
