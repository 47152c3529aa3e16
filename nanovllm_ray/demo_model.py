"""Demo checkpoints: real Qwen3 shapes and tokenizer, seeded random weights, no model hub.

    python -m nanovllm_ray.demo_model --shape tiny --out /tmp/qwen3-tiny

writes a Hugging Face model directory (config.json, generation_config.json, safetensors, tokenizer) that both
`transformers.AutoModelForCausalLM` (Qwen3ForCausalLM) and `AutoTokenizer` load. Weights are generated tensor by
tensor on the CPU, never through the transformers model, so the 8B shape needs about one shard (<= 4 GiB) of memory.

Each tensor is drawn from its own generator seeded by (seed, name), so values do not depend on sharding or order.
Embeddings (and an untied lm_head) are N(0, 1), so logits spread widely and greedy comparisons between
implementations are not flaky. Linear weights are N(0, 1/fan_in), so every projection keeps unit scale, and the
projections that write into the residual stream (o_proj, down_proj) are RESIDUAL_GAIN times larger: each layer
then adds more to the residual than the token's own embedding holds, so the next token depends on the context
through attention rather than echoing the last input token (with tied embeddings a weak residual makes the
model repeat its input, and a test of greedy tokens would not notice broken attention). RMSNorm weights are
1 + N(0, 0.1) so that a missing norm weight shows up.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from nanovllm_ray.tokenizer_files import write_qwen3_tokenizer

VOCAB_SIZE = 151936  # 151,669 used ids padded up, as in every Qwen3 checkpoint
BOS_TOKEN_ID = 151643  # <|endoftext|>
EOS_TOKEN_ID = 151645  # <|im_end|>
MAX_SHARD_BYTES = 4 * 1024**3

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

EMBED_STD = 1.0
LINEAR_STD = 0.02  # written to config.json as initializer_range; the demo weights use 1/sqrt(fan_in)
RESIDUAL_GAIN = 4.0
NORM_NOISE_STD = 0.1


@dataclass(frozen=True, slots=True)
class DemoShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    default_dtype: str

    def __post_init__(self) -> None:
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert self.default_dtype in DTYPES


SHAPES: dict[str, DemoShape] = {
    "tiny": DemoShape(128, 256, 2, 4, 2, 32, tie_word_embeddings=True, default_dtype="float32"),
    "tiny-untied": DemoShape(96, 160, 3, 6, 2, 16, tie_word_embeddings=False, default_dtype="float32"),
    "qwen3-0.6b": DemoShape(1024, 3072, 28, 16, 8, 128, tie_word_embeddings=True, default_dtype="bfloat16"),
    "qwen3-8b": DemoShape(4096, 12288, 36, 32, 8, 128, tie_word_embeddings=False, default_dtype="bfloat16"),
}


def hf_config(shape: str = "tiny", dtype: str | None = None) -> dict:
    """config.json for a demo shape, laid out like a real Qwen3 checkpoint's (rope_theta at top level, etc.)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown demo shape {shape!r}; choose one of {sorted(SHAPES)}")
    s = SHAPES[shape]
    dtype = dtype or s.default_dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": LINEAR_STD,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": 40960,
        "max_window_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1_000_000,
        "sliding_window": None,
        "tie_word_embeddings": s.tie_word_embeddings,
        # transformers 4.x reads torch_dtype, 5.x reads dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
        # as save_pretrained writes it; without it transformers 5.x warns about a Mistral regex on loading
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # not installed: the engine itself does not need it
        return "5.0.0"


def weight_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, named as in Qwen3ForCausalLM; no lm_head when embeddings are tied."""
    h, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_dim = config["num_attention_heads"] * hd
    kv_dim = config["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q_dim, h)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, q_dim)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not config["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (config["vocab_size"], h)))
    return specs


def param_count(config: dict) -> int:
    """Number of parameters, tied embeddings counted once (what `model.num_parameters()` reports)."""
    return sum(math.prod(shape) for _, shape in weight_specs(config))


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The demo value of one tensor: drawn in fp32 from a generator seeded by (seed, name), then cast."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    w = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
        w.mul_(NORM_NOISE_STD).add_(1.0)
    elif name in ("model.embed_tokens.weight", "lm_head.weight"):
        w.mul_(EMBED_STD)
    else:
        gain = RESIDUAL_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        w.mul_(gain / math.sqrt(shape[-1]))
    return w.to(dtype)


def _assign_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, num_shards: int) -> list[int]:
    """Shard index per tensor: contiguous runs of about equal bytes, every shard non-empty."""
    total = sum(math.prod(shape) for _, shape in specs) * itemsize
    shard_of: list[int] = []
    done = 0
    for i, (_, shape) in enumerate(specs):
        want = done * num_shards // total
        prev = shard_of[-1] if shard_of else 0
        s = min(max(want, prev), prev + 1)
        s = max(s, num_shards - len(specs) + i)  # leave one tensor for each shard still to fill
        shard_of.append(s)
        done += math.prod(shape) * itemsize
    return shard_of


def _remove_weight_files(out: Path) -> None:
    # A previous write with another shard count would leave files a loader could pick up.
    stale = [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]
    for path in stale:
        path.unlink(missing_ok=True)


def write_weights(
    out_dir: str | os.PathLike, config: dict, seed: int = 0, num_shards: int = 1, progress: bool = False
) -> list[Path]:
    """Write the seeded weights as safetensors, one shard in memory at a time; returns the files written.

    More than one shard (`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`) is written when
    `num_shards` > 1 or when the weights exceed 4 GiB.
    """
    out = Path(out_dir)
    dtype = DTYPES[config["dtype"]]
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = weight_specs(config)
    total_bytes = sum(math.prod(shape) for _, shape in specs) * itemsize
    n = max(num_shards, math.ceil(total_bytes / MAX_SHARD_BYTES))
    if not 1 <= n <= len(specs):
        raise ValueError(f"num_shards must be between 1 and {len(specs)} (the number of tensors), got {n}")
    shard_of = _assign_shards(specs, itemsize, n)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    _remove_weight_files(out)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="weights", disable=not progress)
    for k, file_name in enumerate(names):
        tensors = {}
        for (name, shape), shard in zip(specs, shard_of, strict=True):
            if shard == k:
                tensors[name] = init_tensor(name, shape, seed, dtype)
                bar.update(tensors[name].nbytes)
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        (out / file_name).chmod(0o644)  # safetensors writes 0600
        del tensors
    bar.close()
    if n > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: names[shard] for (name, _), shard in zip(specs, shard_of, strict=True)},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / f for f in names]


def make_demo_checkpoint(
    out_dir: str | os.PathLike,
    shape: str = "tiny",
    dtype: str | None = None,
    seed: int = 0,
    num_shards: int = 1,
    *,
    progress: bool = False,
) -> Path:
    """Write a loadable Qwen3 model directory with seeded random weights into `out_dir` (created if needed).

    `dtype` defaults to the shape's (float32 for the tiny shapes, bfloat16 for the real ones). Existing weight
    files in `out_dir` are replaced. Returns `out_dir` as a Path.
    """
    config = hf_config(shape, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, config, seed=seed, num_shards=num_shards, progress=progress)
    generation_config = {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": [EOS_TOKEN_ID, BOS_TOKEN_ID],
        "pad_token_id": BOS_TOKEN_ID,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    write_qwen3_tokenizer(out)
    # config.json last: its presence marks a complete checkpoint (see ensure_demo_checkpoint).
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def ensure_demo_checkpoint(
    out_dir: str | os.PathLike,
    shape: str = "tiny",
    dtype: str | None = None,
    seed: int = 0,
    num_shards: int = 1,
    *,
    progress: bool = False,
) -> Path:
    """`make_demo_checkpoint` unless `out_dir/config.json` already exists; safe for processes racing on one dir.

    The checkpoint is written to a temporary directory next to `out_dir` and renamed into place, so `out_dir` is
    either absent, empty, or complete. An existing checkpoint is not checked against `shape`/`dtype`/`seed`.
    """
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any other directory
    try:
        make_demo_checkpoint(tmp, shape, dtype, seed, num_shards, progress=progress)
        try:
            os.rename(tmp, out)  # atomic; replaces `out` only if it is an empty directory
        except OSError:
            if not (out / "config.json").exists():
                raise FileExistsError(f"{out} exists, is not empty and holds no config.json") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the shape's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="safetensors files (more if over 4 GiB)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = make_demo_checkpoint(args.out, args.shape, args.dtype, args.seed, args.shards, progress=sys.stderr.isatty())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    config = json.loads((out / "config.json").read_text())
    print(
        f"wrote {out}: {args.shape}, {param_count(config):,} parameters, {config['dtype']}, "
        f"{size / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
