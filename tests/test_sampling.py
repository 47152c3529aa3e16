"""Sampling: filters restrict the sampled set on a known distribution; seeds reproduce; stop strings cut text."""

import pytest
import torch
from conftest import assert_no_leak

from nanovllm_ray import LLM, RequestState, SamplingParams
from nanovllm_ray.layers.sampler import SamplingTensors, merge_shard_samples, sample, sample_temperature

# A known distribution over 8 tokens: probabilities 0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01
PROBS = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])


def _tensors(n: int, temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seeds=None, positions=None):
    return SamplingTensors(
        temperatures=torch.full((n,), temperature), top_ks=torch.full((n,), top_k, dtype=torch.int64),
        top_ps=torch.full((n,), top_p), min_ps=torch.full((n,), min_p), seeds=seeds or [None] * n,
        positions=positions or [0] * n, all_greedy=temperature == 0, any_greedy=temperature == 0,
        any_top_k=top_k < 8, any_top_p=top_p < 1,
        any_min_p=min_p > 0, max_logprobs=None)


def _draw(n=4000, **kw) -> set[int]:
    logits = PROBS.log().expand(n, -1).clone()
    return set(sample(logits, _tensors(n, **kw)).token_ids.tolist())


def test_unfiltered_sampling_reaches_the_whole_support():
    torch.manual_seed(0)
    assert _draw() == set(range(8))


@pytest.mark.parametrize("kw, allowed", [
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_k": 1}, {0}),
    ({"top_p": 0.5}, {0, 1}),  # 0.4 < 0.5, 0.4 + 0.2 >= 0.5: keep two
    ({"top_p": 0.76}, {0, 1, 2, 3}),  # 0.75 < 0.76: the fourth token is needed
    ({"min_p": 0.3}, {0, 1, 2}),  # threshold 0.12
    ({"min_p": 0.2, "top_k": 2}, {0, 1}),
])
def test_filters_restrict_the_sampled_set(kw, allowed):
    torch.manual_seed(0)
    assert _draw(**kw) == allowed


def test_sampling_frequencies_follow_the_distribution():
    torch.manual_seed(0)
    n = 20000
    tokens = sample(PROBS.log().expand(n, -1).clone(), _tensors(n)).token_ids
    freq = torch.bincount(tokens, minlength=8).float() / n
    assert torch.allclose(freq, PROBS, atol=0.015), freq


def test_temperature_path_of_the_decode_graphs_follows_the_distribution():
    """sample_temperature (what the decode graphs call): T=1 rows follow softmax, T=0 rows are the argmax, and the
    result lands in `out`."""
    torch.manual_seed(0)
    n = 20000
    logits = PROBS.log().expand(n, -1).clone()
    temps = torch.ones(n, dtype=torch.float64)
    temps[::2] = 0.0
    out = torch.full((n,), -1, dtype=torch.int64)
    sample_temperature(logits, temps, out=out)
    assert (out[::2] == 0).all()
    freq = torch.bincount(out[1::2], minlength=8).float() / (n // 2)
    assert torch.allclose(freq, PROBS, atol=0.02), freq


@pytest.mark.parametrize("tp", [2, 4])
def test_merged_vocabulary_slices_give_the_whole_vocabulary_argmax(tp):
    """Tensor-parallel sampling in the decode graphs: each rank's winner of its vocabulary slice (score, token id),
    merged, is the argmax over the whole vocabulary, ties included (the lowest token id wins, as argmax does).
    Scores here are the logits (T = 0) or logits + Gumbel noise (a draw), made over the whole vocabulary."""
    torch.manual_seed(0)
    n, vocab = 64, 1024
    logits = torch.randn(n, vocab).round(decimals=1)  # many equal values, within and across slices
    logits[:8] = 0.0  # every token ties: token 0
    logits[8:16, 3] = logits[8:16, (tp - 1) * vocab // tp + 5] = 9.0  # a tie across slices: token 3
    gumbel = -torch.empty(n, vocab).exponential_().log()
    for scores in (logits, logits + gumbel):
        shards = torch.stack([torch.stack([s.max(-1).values.double(), (s.argmax(-1) + i * s.shape[1]).double()], -1)
                              for i, s in enumerate(scores.chunk(tp, -1))])
        assert torch.equal(merge_shard_samples(shards), scores.argmax(-1))
    out = torch.full((n,), -1, dtype=torch.int64)
    assert merge_shard_samples(shards, out) is out and torch.equal(out, (logits + gumbel).argmax(-1))


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = PROBS.log().expand(4, -1).clone()
    t = _tensors(4)
    t.temperatures = torch.tensor([0.0, 1.0, 0.0, 1.0])
    t.all_greedy, t.any_greedy = False, True
    for _ in range(20):
        tokens = sample(logits, t).token_ids
        assert tokens[0] == 0 and tokens[2] == 0


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logits = torch.randn(1, 1000).expand(6, -1).clone()
    a = sample(logits[:2], _tensors(2, seeds=[7, 8], positions=[3, 3])).token_ids
    b = sample(logits, _tensors(6, seeds=[None, 7, None, 8, None, None], positions=[0, 3, 0, 3, 0, 0])).token_ids
    assert a.tolist() == [b[1].item(), b[3].item()]


def test_seeded_generation_is_reproducible(tiny_model):
    llm = LLM(tiny_model, num_kvcache_blocks=256, max_model_len=512)
    prompt = list(range(1000, 1040))
    sp = SamplingParams(temperature=20.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], sp, use_tqdm=False)[0].token_ids
    others = [list(range(2000 + i, 2030 + 3 * i)) for i in range(5)]
    batch = llm.generate(others[:2] + [prompt] + others[2:], [SamplingParams(temperature=1.0, max_tokens=24)] * 2
                         + [sp] + [SamplingParams(temperature=1.0, max_tokens=24)] * 3, use_tqdm=False)
    assert batch[2].token_ids == alone
    assert len(set(alone)) > 3  # really sampled, not near-greedy
    other_seed = llm.generate([prompt], SamplingParams(temperature=20.0, top_p=0.9, max_tokens=24, seed=99,
                                                       ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone
    assert_no_leak(llm.engine)


def test_stop_strings_and_stop_tokens(tiny_model):
    llm = LLM(tiny_model, num_kvcache_blocks=256, max_model_len=512)
    prompt = "The quick brown fox"
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                          use_tqdm=False)[0]
    text = greedy.text
    assert len(text) > 10
    stop = text[5:8]
    cut = text[:text.find(stop)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out.text == cut and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.num_generated_tokens < 24
    # streaming through the output path (what the ingress does) never shows text past the stop string, and a
    # stop string found there ends the engine's request
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    engine.add_request("s", prompt, sp)
    state = RequestState("s", sp, engine.tokenizer)
    streamed = ""
    while not state.finished:
        for o in engine.step():
            streamed += state.update(o).text
            assert stop not in streamed
    assert state.stopped_by_string and engine.abort_request("s")
    assert streamed == cut and state.text == cut and state.token_ids == out.token_ids
    # a stop token id ends generation right after that token
    tok = greedy.token_ids[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                stop_token_ids=[tok]), use_tqdm=False)[0]
    assert out.token_ids == greedy.token_ids[:greedy.token_ids.index(tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert_no_leak(engine)


def test_logprobs(tiny_model):
    llm = LLM(tiny_model, num_kvcache_blocks=256, max_model_len=512)
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.logprobs) == 5
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) < 1e-5  # greedy: chosen is the top
        assert lp <= 0 and top[0][1] >= top[1][1] >= top[2][1]


def test_eos_ends_generation(tiny_model):
    llm = LLM(tiny_model, num_kvcache_blocks=256, max_model_len=512)
    first = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    llm.engine.eos_token_ids = {first.token_ids[2]}  # pretend the third greedy token is EOS
    out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:first.token_ids.index(
        first.token_ids[2]) + 1]
