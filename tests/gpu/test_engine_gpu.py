"""The engine on CUDA: Triton attention, CUDA graphs, against transformers and against eager execution."""

import random

import pytest
import torch
from conftest import NEAR_TIE_SLACK
from conftest import decisive as is_decisive

from nanovllm_ray import LLM, SamplingParams
from nanovllm_ray.executor.step import StepInput

pytestmark = pytest.mark.gpu


_step = StepInput.forward_only


def _teacher_forced(llm: LLM, streams: list[list[int]], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Our logits at every position of each stream: one batched prefill of the prompts, then batched decode
    steps (CUDA graphs unless eager) feeding the stream's own next tokens."""
    runner = llm.engine.executor.runner
    bs = llm.config.block_size
    blocks_per_seq = (max(map(len, streams)) + bs - 1) // bs
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))[::-1] for i in range(len(streams))]
    logits = runner.forward_logits(_step([s[:p] for s, p in zip(streams, prompt_lens)], [0] * len(streams),
                                         tables, bs))
    out = list(logits.split(prompt_lens))
    steps = len(streams[0]) - prompt_lens[0]
    assert all(len(s) - p == steps for s, p in zip(streams, prompt_lens))
    for t in range(steps):
        step = _step([[s[p + t]] for s, p in zip(streams, prompt_lens)], [p + t for p in prompt_lens], tables, bs)
        row = runner.forward_logits(step)
        out = [torch.cat([o, row[i:i + 1]]) for i, o in enumerate(out)]
    return [o[:-1] for o in out]  # the last position predicts past the stream


# 4 streams: decode steps of 4 rows (the fused GEMV); 8: of 8 rows (the skinny GEMM where TUNED takes it)
@pytest.mark.parametrize("enforce_eager,streams", [(False, 4), (True, 4), (False, 8)])
def test_teacher_forced_against_transformers_bf16(model_06b, enforce_eager, streams):
    """Same token stream through both. Random weights give many near-ties between the top two logits, where any
    bf16 implementation flips a coin: so the truth is transformers in fp32, and we must agree with it on 99% of the
    positions whose top-two gap exceeds bf16 noise, and overall nearly as well as transformers' own bf16 does
    (NEAR_TIE_SLACK: how much rounding alone moves that)."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    prompt_lens = [300, 151, 77, 33, 20, 9, 64, 5][:streams]
    streams = [[rng.randrange(0, 150000) for _ in range(p + 40)] for p in prompt_lens]
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref_model = AutoModelForCausalLM.from_pretrained(model_06b, dtype=dtype).cuda().eval()
        with torch.no_grad():
            refs[dtype] = torch.cat([ref_model(torch.tensor([s], device="cuda")).logits[0, :-1].float()
                                     for s in streams])
        del ref_model
        torch.cuda.empty_cache()
    llm = LLM(model_06b, max_model_len=1024, enforce_eager=enforce_eager, num_kvcache_blocks=256)
    assert llm.engine.executor.runner.dtype == torch.bfloat16
    assert (llm.engine.executor.runner.graphs is None) == enforce_eager
    ours = torch.cat([o.float() for o in _teacher_forced(llm, streams, prompt_lens)])
    truth, hf16 = refs[torch.float32], refs[torch.bfloat16]
    decisive = is_decisive(truth)
    agree = (ours.argmax(-1) == truth.argmax(-1)).float()
    hf_agree = (hf16.argmax(-1) == truth.argmax(-1)).float()
    ours_vs_hf16 = (ours.argmax(-1) == hf16.argmax(-1)).float().mean().item()
    err = ((ours - hf16).abs().amax() / hf16.abs().amax()).item()
    print(f"positions {len(agree)}, decisive {int(decisive.sum())}; argmax agreement with fp32: ours "
          f"{agree.mean():.4f}, transformers bf16 {hf_agree.mean():.4f}; on decisive positions ours "
          f"{agree[decisive].mean():.4f}; ours vs transformers bf16 {ours_vs_hf16:.4f}; "
          f"max |diff| / max |logit| vs transformers bf16 {err:.4f}")
    assert agree.mean() >= hf_agree.mean() - NEAR_TIE_SLACK
    assert agree[decisive].mean() >= 0.99
    assert err < 0.05


def test_cuda_graph_replay_equals_eager(model_06b):
    rng = random.Random(1)
    lens = [5, 17, 64, 100, 250, 33, 1, 9, 130]  # 9 sequences: the graph of batch 16 with 7 padded rows
    streams = [[rng.randrange(0, 150000) for _ in range(n + 8)] for n in lens]
    results = {}
    for eager in (True, False):
        llm = LLM(model_06b, max_model_len=1024, enforce_eager=eager, num_kvcache_blocks=256)
        results[eager] = _teacher_forced(llm, streams, lens)
        del llm
        torch.cuda.empty_cache()
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a[-8:].float(), b[-8:].float(), atol=0.05 * a.abs().max().item(), rtol=0.02)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.99


def test_prefill_graphs_equal_eager(model_06b):
    """Prefill steps of up to 8 sequences and prefill_graph_tokens tokens replay a CUDA graph (the token count padded
    up): their logits equal eager execution's, for a plain prefill of 5 sequences and then a chunk over each one's
    cached prefix."""
    rng = random.Random(2)
    lens = [5, 100, 250, 33, 1]
    streams = [[rng.randrange(0, 150000) for _ in range(n + 40)] for n in lens]
    results = {}
    for eager in (True, False):
        llm = LLM(model_06b, max_model_len=1024, enforce_eager=eager, num_kvcache_blocks=256)
        runner = llm.engine.executor.runner
        assert (runner.prefill_graphs is None) == eager
        bs = llm.config.block_size
        tables = [list(range(i * 20, (i + 1) * 20)) for i in range(len(streams))]
        plain = runner.forward_logits(_step([s[:p] for s, p in zip(streams, lens)], [0] * len(lens), tables, bs))
        chunk = runner.forward_logits(_step([s[p:] for s, p in zip(streams, lens)], lens, tables, bs))
        results[eager] = (plain.float().cpu(), chunk.float().cpu())
        del llm, runner
        torch.cuda.empty_cache()
    for a, b in zip(results[True], results[False]):  # bf16: eager prefill is FlashAttention-2, the graphs' Triton
        assert a.shape == b.shape
        err = ((a - b).abs().amax() / a.abs().amax()).item()
        decisive = is_decisive(a)
        agree = (a.argmax(-1) == b.argmax(-1)).float()
        print(f"\nprefill graphs vs eager: max |diff| / max |logit| {err:.4f}, argmax agreement {agree.mean():.4f}, "
              f"on decisive positions {agree[decisive].mean():.4f} ({int(decisive.sum())} of {len(agree)})")
        assert err < 0.05 and agree[decisive].mean() >= 0.99


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny"))


@pytest.mark.parametrize("kwargs", [
    {},  # fresh + shared prefixes
    {"max_num_batched_tokens": 64},  # chunked prefill
    {"num_kvcache_blocks": 48, "max_num_batched_tokens": 512},  # preemption
    {"block_size": 256, "num_kvcache_blocks": 16},
    {"scheduling_policy": "prefill_first", "num_kvcache_blocks": 48},
])
def test_engine_on_gpu_matches_transformers_fp32(tiny, kwargs):
    """The CPU correctness scenarios, on CUDA with the Triton backend and CUDA graphs, in fp32."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    prompts = [[rng.randrange(0, 150000) for _ in range(n)] for n in [1, 5, 16, 17, 40, 100, 250, 333]]
    second = [p[:max(1, len(p) * 3 // 4)] + [7, 8, 9] for p in prompts]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).cuda().eval()
    refs = []
    with torch.no_grad():
        for p in prompts + second:
            out = ref_model.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    args = {"num_kvcache_blocks": 512, **kwargs}
    llm = LLM(tiny, dtype="float32", max_model_len=1024, **args)
    assert llm.engine.executor.runner.backend.name == "triton"
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    outs2 = llm.generate(second, sp, use_tqdm=False)
    got += [o.token_ids for o in outs2]
    assert got == refs
    if kwargs.get("num_kvcache_blocks") == 48:  # 768 tokens of KV for a batch that needs about 1,260
        assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    if bm.num_blocks > 48:
        assert sum(o.num_cached_tokens for o in outs2) > 0
