"""Errors a user can cause name the value and the limit."""

import json
import shutil

import pytest
from conftest import assert_no_leak

from nanovllm_ray import LLM, ConfigError, RequestError, SamplingParams
from nanovllm_ray.models.loader import CheckpointError


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, num_kvcache_blocks=64, max_model_len=256)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_corrupt_checkpoint(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(str(bad))
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLM(str(bad))
    (bad / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="config.json"):
        LLM(str(bad))


def test_checkpoint_with_wrong_shape(tiny_model, tmp_path):
    bad = tmp_path / "shape"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_proj|up_proj|down_proj"):
        LLM(str(bad))


def test_a_head_dim_the_gpu_kernels_cannot_tile_gets_a_clear_error_or_the_reference_path(monkeypatch):
    import sys
    import types

    import torch

    from nanovllm_ray.layers.attention import select_backend, triton_supports_head_dim

    assert [triton_supports_head_dim(d) for d in (16, 64, 128, 256)] == [True] * 4
    assert not any(triton_supports_head_dim(d) for d in (8, 24, 96, 512))
    with pytest.raises(ValueError, match="head_dim to be a power of two from 16 to 256; this model's head_dim is 24"):
        select_backend("triton", torch.device("cuda"), 16, 24, torch.bfloat16)
    # auto on CUDA (triton importable) never picks kernels that cannot take the model: the reference, with a warning
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert select_backend("auto", torch.device("cuda"), 16, 24, torch.bfloat16).name == "torch"


@pytest.mark.parametrize("kwargs, match", [
    ({"max_model_len": 10**6}, "max_model_len=1000000 must be in \\[1, 40960\\]"),
    ({"block_size": 24}, "block_size=24 must be a power of two"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"tensor_parallel_size": 3}, "tensor_parallel_size=3 must divide num_attention_heads=4"),
    ({"max_num_seqs": 0}, "max_num_seqs=0"),
    ({"no_such_key": 1}, "unknown config keys \\['no_such_key'\\]"),
])
def test_bad_config(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LLM(tiny_model, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.5}, "temperature=-0.5 must be >= 0"),
    ({"top_p": 0.0}, "top_p=0.0 must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_k": -2}, "top_k=-2"),
    ({"min_p": 2.0}, "min_p=2.0"),
    ({"max_tokens": 0}, "max_tokens=0 must be >= 1"),
    ({"logprobs": 50}, "logprobs=50 must be in \\[0, 20\\]"),
    ({"stop": [""]}, "stop strings must not be empty"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_leave_the_engine_working(llm):
    with pytest.raises(RequestError, match="prompt has 300 tokens; max_model_len is 256"):
        llm.generate([[5] * 300], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(RequestError, match="token id 999999 is outside the vocabulary \\[0, 151936\\)"):
        llm.generate([[1, 999999]], use_tqdm=False)
    # 64 blocks x 16 = 1024 tokens of KV: fine. A batch with one bad prompt adds none of them.
    with pytest.raises(RequestError):
        llm.generate([[1, 2, 3], [5] * 300], SamplingParams(max_tokens=4), use_tqdm=False)
    assert_no_leak(llm.engine)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert out[0].num_generated_tokens == 4
    assert_no_leak(llm.engine)


def test_request_larger_than_the_kv_cache(tiny_model):
    small = LLM(tiny_model, num_kvcache_blocks=4, max_model_len=256)  # 64 tokens of KV
    with pytest.raises(RequestError, match="needs 100 tokens of KV cache; the cache holds 64"):
        small.generate([[1] * 50], SamplingParams(max_tokens=50), use_tqdm=False)


def test_incremental_api_and_abort(llm):
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", [1, 2, 3, 4, 5] * 10, sp)
    engine.add_request("b", "Hello world", sp)
    with pytest.raises(RequestError, match="request id 'a' is already in use"):
        engine.add_request("a", "x", sp)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    finished = {}
    for _ in range(5):
        for out in engine.step():
            seen[out.request_id] += out.new_token_ids
    assert seen["a"] and seen["b"]
    assert engine.abort_request("a") and not engine.abort_request("a")
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
            seen["b"] += out.new_token_ids
            if out.finished:
                finished["b"] = out
    assert finished["b"].finish_reason == "length"
    assert len(seen["b"]) == 20 and finished["b"].num_prompt_tokens == 2
    assert_no_leak(engine)


def test_a_step_that_fails_for_one_request_ends_only_that_request(llm):
    """Values are range-checked when a request is added; if one still fails its step (here: changed after the
    checks), that request ends with an error output and the others run on, with no block leaked."""
    engine = llm.engine
    sp = SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True)
    engine.add_request("good", [1, 2, 3, 4], sp)
    engine.add_request("poison", [5, 6, 7], SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True))
    engine.get_sequence("poison").sampling_params.temperature = "hot"  # no float tensor takes it
    outs: dict[str, list] = {"good": [], "poison": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert outs["poison"][-1].finish_reason == "error" and "could not run this request" in outs["poison"][-1].error
    assert sum(len(o.new_token_ids) for o in outs["good"]) == 6 and outs["good"][-1].finish_reason == "length"
    assert engine.num_failed_requests == 1
    assert_no_leak(engine)
    # the engine serves the next request as usual
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].num_generated_tokens == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 10**20}, "top_k=100000000000000000000 must be -1 \\(off\\), 0 \\(off\\) or >= 1, and at most"),
    ({"seed": 2**64}, "seed=18446744073709551616 must be in"),
    ({"temperature": float("nan")}, "temperature=nan must be a finite number"),
    ({"top_p": float("inf")}, "top_p=inf must be a finite number"),
    ({"max_tokens": 2.5}, "max_tokens=2.5 must be an integer"),
    ({"stop_token_ids": [-3]}, "stop_token_ids: -3 is not a token id"),
])
def test_values_bound_for_tensors_are_range_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_refuses_what_the_model_cannot_take(llm):
    with pytest.raises(RequestError, match="stop_token_ids: 999999999 is outside the vocabulary"):
        llm.engine.add_request("x", [1, 2], SamplingParams(stop_token_ids=[999999999]))
    with pytest.raises(RequestError, match="prompt cannot be tokenized: TypeError"):
        llm.engine.add_request("y", "ab\ud800cd", SamplingParams())
    assert_no_leak(llm.engine)
