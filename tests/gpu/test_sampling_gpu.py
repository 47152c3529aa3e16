"""Sampling on the GPU: the Triton sampler against torch, inside CUDA graphs, and through the engine's decode graphs
(temperature-only requests sample in the graph; seeded / filtered / logprobs requests from the graph's logits)."""

import pytest
import torch

from nanovllm_ray import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sampling():
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import sampling

    return sampling


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_greedy_equals_torch_argmax(sampling, rows):
    torch.manual_seed(0)
    logits = torch.randn(rows, 151936, device="cuda").bfloat16()  # many exact ties in bf16
    got = sampling.sample_tokens(logits, torch.zeros(rows, device="cuda"))
    assert torch.equal(got, logits.float().argmax(-1))


def test_draws_follow_softmax(sampling):
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], device="cuda")
    t = 0.7
    logits = torch.full((20000, 151936), -1e4, device="cuda", dtype=torch.bfloat16)
    cols = torch.tensor([5, 70000, 100001, 151935], device="cuda")
    logits[:, cols] = (probs.log() * t).bfloat16()
    tokens = sampling.sample_tokens(logits, torch.full((20000,), t, device="cuda"))
    freq = torch.stack([(tokens == c).float().mean() for c in cols])
    assert torch.allclose(freq, probs, atol=0.015), freq.tolist()


def test_replays_in_a_cuda_graph_with_fresh_noise(sampling):
    logits = torch.zeros(64, 151936, device="cuda", dtype=torch.bfloat16)
    temps = torch.ones(64, device="cuda", dtype=torch.float64)
    out = torch.zeros(64, dtype=torch.int64, device="cuda")
    sampling.sample_tokens(logits, temps, out=out)  # warm-up (JIT, seed buffer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampling.sample_tokens(logits, temps, out=out)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny"))


def test_engine_sampling_through_decode_graphs(tiny):
    prompt = [[11, 22, 33, 44, 55]]
    results = {}
    for eager in (True, False):
        llm = LLM(tiny, dtype="float32", max_model_len=256, num_kvcache_blocks=256, enforce_eager=eager)
        seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=24, ignore_eos=True)
        logprobs = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
        results[eager] = llm.generate(prompt * 2, [seeded, logprobs], use_tqdm=False)
        if not eager:  # temperature-only: sampled inside the graph, different per request
            free = llm.generate(prompt * 16, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
                                use_tqdm=False)
            assert len({tuple(o.token_ids) for o in free}) > 8
            bm = llm.engine.block_manager
            assert bm.num_free_blocks == bm.num_blocks
        del llm
        torch.cuda.empty_cache()
    eager, graphs = results[True], results[False]
    assert eager[0].token_ids == graphs[0].token_ids  # a seed fixes the draws on either path
    assert eager[1].token_ids == graphs[1].token_ids
    a = [chosen for chosen, _ in eager[1].logprobs]
    b = [chosen for chosen, _ in graphs[1].logprobs]
    assert a == pytest.approx(b, abs=0.05)
