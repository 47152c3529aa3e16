"""Engine configuration: one dataclass, vLLM's key names where vLLM has one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration value a user set is out of range or inconsistent."""


@dataclass(slots=True)
class Config:
    model: str
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU
    device: str = "auto"  # auto | cuda | cpu
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 1.0  # KV pool size on CPU (on GPU it comes from gpu_memory_utilization)
    num_kvcache_blocks: int | None = None  # forces the pool size (tests, benchmarks)
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enable_kv_cache_events: bool = False  # record block stored/removed events for a prefix-aware router
    async_scheduling: bool = True  # launch step t+1 before applying step t's tokens
    scheduling_policy: str = "prefill_first"  # prefill_first (nano-vllm; measured faster) | mixed (vLLM v1)
    attention_backend: str = "auto"  # auto | torch | triton | flash_attn
    block_size: int = 16
    seed: int = 0
    tokenizer: str | None = None  # defaults to the model directory
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ConfigError(f"model directory {self.model!r} does not exist")
        cfg_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"model directory {self.model!r} has no config.json: not a Hugging Face checkpoint")
        try:
            with open(cfg_path) as f:
                self.hf_config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {cfg_path}: {e}") from e
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if k not in self.hf_config]
        if missing:
            raise ConfigError(f"{cfg_path} lacks {missing}: not a Qwen3 config")
        limit = int(self.hf_config.get("max_position_embeddings", 40960))
        if self.max_model_len is None:
            self.max_model_len = limit
        _check(self.max_model_len >= 1 and self.max_model_len <= limit,
               f"max_model_len={self.max_model_len} must be in [1, {limit}] (max_position_embeddings)")
        _check(self.dtype in _DTYPES, f"dtype={self.dtype!r} must be one of {_DTYPES}")
        _check(self.device in ("auto", "cuda", "cpu"), f"device={self.device!r} must be auto, cuda or cpu")
        _check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
               f"block_size={self.block_size} must be a power of two")
        _check(self.max_num_seqs >= 1, f"max_num_seqs={self.max_num_seqs} must be >= 1")
        _check(self.max_num_batched_tokens >= 1, f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        if not self.enable_chunked_prefill:
            _check(self.max_num_batched_tokens >= self.max_model_len,
                   f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_model_len="
                   f"{self.max_model_len} when chunked prefill is off")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        _check(self.kv_cache_memory_gb > 0, f"kv_cache_memory_gb={self.kv_cache_memory_gb} must be > 0")
        _check(self.num_kvcache_blocks is None or self.num_kvcache_blocks >= 1,
               f"num_kvcache_blocks={self.num_kvcache_blocks} must be >= 1")
        _check(self.tensor_parallel_size >= 1, f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        kv_heads = self.hf_config.get("num_key_value_heads", self.hf_config["num_attention_heads"])
        heads = self.hf_config["num_attention_heads"]
        tp = self.tensor_parallel_size
        _check(heads % tp == 0, f"tensor_parallel_size={tp} must divide num_attention_heads={heads}")
        _check(kv_heads % tp == 0 or tp % kv_heads == 0,
               f"tensor_parallel_size={tp} and num_key_value_heads={kv_heads}: one must divide the other")
        _check(self.scheduling_policy in ("mixed", "prefill_first"),
               f"scheduling_policy={self.scheduling_policy!r} must be 'mixed' or 'prefill_first'")
        _check(self.attention_backend in ("auto", "torch", "triton", "flash_attn"),
               f"attention_backend={self.attention_backend!r} must be auto, torch, triton or flash_attn")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> Config:
        known = {f.name for f in fields(cls)} - {"hf_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(model=model, **kwargs)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.hf_config.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        gen = os.path.join(self.model, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen) as f:
                g = json.load(f).get("eos_token_id")
            ids += g if isinstance(g, list) else [g] if g is not None else []
        return sorted(set(ids))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
