"""Demo checkpoints load in transformers' Qwen3ForCausalLM and are reproducible, whatever the sharding."""

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from nanovllm_ray.demo_model import (
    SHAPES,
    ensure_demo_checkpoint,
    hf_config,
    main,
    make_demo_checkpoint,
    param_count,
    weight_specs,
)


def load_weights(model_dir) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shape="tiny")


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-untied", shape="tiny-untied")


def test_param_count_qwen3_06b():
    # Qwen3-0.6B: 440,467,456 non-embedding parameters + 151,936 x 1,024 tied embeddings.
    config = hf_config("qwen3-0.6b")
    assert param_count(config) == 596_049_920
    assert param_count(config) - config["vocab_size"] * config["hidden_size"] == 440_467_456
    assert param_count(hf_config("qwen3-8b")) == 8_190_735_360


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_weight_specs_match_transformers(shape):
    # Built on the meta device: names and shapes only, nothing allocated.
    config = hf_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config.from_dict(config))
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del expected["lm_head.weight"]
    assert dict(weight_specs(config)) == expected
    assert model.num_parameters() == param_count(config)


def test_config_as_transformers_reads_it(tiny_dir):
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "qwen3" and config.architectures == ["Qwen3ForCausalLM"]
    assert config.rope_parameters["rope_theta"] == 1_000_000
    assert config.dtype == torch.float32 and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 32)
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]


@pytest.mark.parametrize("fixture", ["tiny_dir", "untied_dir"])
def test_loads_in_transformers(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stored = load_weights(model_dir)
    for name, tensor in model.state_dict().items():
        if name in stored:
            torch.testing.assert_close(tensor, stored[name], rtol=0, atol=0)
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645, 198]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 7, 151936) and torch.isfinite(logits).all()


def test_tied_and_untied(tiny_dir, untied_dir):
    tied = load_weights(tiny_dir)
    assert "lm_head.weight" not in tied
    untied = load_weights(untied_dir)
    assert untied["lm_head.weight"].shape == untied["model.embed_tokens.weight"].shape == (151936, 96)
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_init_statistics(tiny_dir):
    w = load_weights(tiny_dir)
    assert w["model.embed_tokens.weight"].std().item() == pytest.approx(1.0, rel=0.01)
    assert w["model.layers.0.mlp.up_proj.weight"].std().item() == pytest.approx(128**-0.5, rel=0.02)
    assert w["model.layers.0.mlp.down_proj.weight"].std().item() == pytest.approx(4 * 256**-0.5, rel=0.02)
    norm = w["model.layers.1.post_attention_layernorm.weight"]
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05) and 0.05 < norm.std().item() < 0.15
    assert not torch.equal(w["model.layers.0.mlp.up_proj.weight"], w["model.layers.0.mlp.gate_proj.weight"])


def test_seeded_and_reproducible(tmp_path, tiny_dir):
    again = load_weights(make_demo_checkpoint(tmp_path / "again", shape="tiny", seed=0))
    first = load_weights(tiny_dir)
    assert again.keys() == first.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
    other = load_weights(make_demo_checkpoint(tmp_path / "other", shape="tiny", seed=1))
    for name in first:
        assert not torch.equal(first[name], other[name]), name


def test_sharded_same_tensors(tmp_path, untied_dir):
    out = make_demo_checkpoint(tmp_path / "sharded", shape="tiny-untied", num_shards=2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    total = 0
    for file in files:
        with safe_open(out / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {name for name, where in index["weight_map"].items() if where == file}
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert list(index["weight_map"]) == [name for name, _ in weight_specs(hf_config("tiny-untied"))]

    sharded, unsharded = load_weights(out), load_weights(untied_dir)
    assert sharded.keys() == unsharded.keys()
    for name in unsharded:
        assert torch.equal(sharded[name], unsharded[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # Rewriting with fewer shards removes the old files, so no stale index is left for a loader to find.
    make_demo_checkpoint(out, shape="tiny-untied", num_shards=1)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_dtype(tmp_path):
    out = make_demo_checkpoint(tmp_path / "bf16", shape="tiny", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_weights(out).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown demo shape"):
        make_demo_checkpoint(tmp_path / "x", shape="qwen3-1t")
    with pytest.raises(ValueError, match="unsupported dtype"):
        make_demo_checkpoint(tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="num_shards"):
        make_demo_checkpoint(tmp_path / "x", shape="tiny", num_shards=1000)


def test_ensure_is_idempotent_and_race_safe(tmp_path):
    out = tmp_path / "raced"
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_demo_checkpoint(out, shape="tiny"))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [out] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raced"]  # no temp dirs left behind
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(out, shape="tiny", seed=5) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="no config.json"):
        ensure_demo_checkpoint(tmp_path / "occupied", shape="tiny")


def test_cli(tmp_path, capsys):
    main(["--shape", "tiny", "--out", str(tmp_path / "cli"), "--seed", "3", "--shards", "2"])
    assert "19,743,488 parameters" in capsys.readouterr().out
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()
    assert (tmp_path / "cli" / "tokenizer.json").exists()


def test_next_token_depends_on_the_context(tiny_dir):
    """Greedy tokens must come from attention over the context, not echo the last input token: otherwise tests
    that compare greedy tokens with transformers could not see a broken attention or KV cache."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.randint(0, 150000, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0]
        order = torch.cat([torch.randperm(199, generator=torch.Generator().manual_seed(1)), torch.tensor([199])])
        shuffled = model(ids[:, order]).logits[0]
    assert (logits.argmax(-1) == ids[0]).float().mean() < 0.2  # not an echo of the input
    # the same last token after a different context gives a different prediction
    assert not torch.allclose(logits[-1], shuffled[-1], atol=1.0)
