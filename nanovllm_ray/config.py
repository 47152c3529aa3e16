"""Engine configuration: one dataclass, vLLM's key names where vLLM has one.

Every engine setting is declared here once, with its type, its one default and its help: the Serve app's args
(deployments.app.LLMAppArgs) and the batch job's flags are made from these fields (`Config.settings()`), as vLLM's
EngineArgs makes its CLI from its own dataclass. Which executor runs the ranks is a setting too (`executor`,
`dispatch`, `worker_num_cpus`), read in one place: nanovllm_ray.executor.make_executor.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration value a user set is out of range or inconsistent."""


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(slots=True)
class Config:
    model: str
    dtype: str = _setting("auto", "auto | float32 | float16 | bfloat16 (auto: the checkpoint's on GPU, float32 on CPU)")
    device: str = _setting("auto", "auto | cuda | cpu")
    max_model_len: int | None = _setting(None, "prompt + output limit (default: the checkpoint's)")
    max_num_seqs: int = _setting(256, "running requests at once")
    max_num_batched_tokens: int = _setting(16384, "tokens per step (prefills are chunked to fit)")
    gpu_memory_utilization: float = _setting(0.9, "fraction of GPU memory for weights, activations and KV")
    kv_cache_memory_gb: float = _setting(1.0, "KV pool on CPU (on GPU it comes from gpu_memory_utilization)")
    num_kvcache_blocks: int | None = _setting(None, "force the KV pool size (tests, benchmarks)")
    enforce_eager: bool = _setting(False, "no CUDA graphs")
    prefill_graph_tokens: int = _setting(2048, "CUDA graphs for prefill steps up to this many tokens (of up to 8 "
                                               "sequences; a short prompt's first token without the host's "
                                               "per-op cost); 0: prefills run eagerly")
    fused_gemv: bool = _setting(True, "decode batches of up to 4 rows on CUDA: each projection one Triton kernel, "
                                "with the RMSNorm before it and SiLU-and-mul after it folded in (kernels/gemv.py)")
    tensor_parallel_size: int = _setting(1, "ranks (GPUs) per engine")
    fast_all_reduce: bool = _setting(True, "tensor parallelism on GPUs with P2P access: decode-sized all-reduces "
                                           "through one-shot/two-shot kernels over symmetric memory, not NCCL")
    fused_all_reduce_norm: bool = _setting(True, "with the fast all-reduce: decode-sized all-reduces through "
                                                 "one kernel that pushes each rank's rows to its peers (no "
                                                 "barrier), fused with a row-parallel layer's residual add "
                                                 "and the RMSNorm after it (kernels/allreduce_norm.py)")
    enable_prefix_caching: bool = _setting(True, "reuse KV blocks across requests that share a prefix")
    enable_chunked_prefill: bool = _setting(True, "split long prompts over steps")
    enable_kv_cache_events: bool = _setting(False, "record block stored/removed events (a prefix-aware router)")
    async_scheduling: bool = _setting(True, "launch step t+1 before applying step t's tokens")
    scheduling_policy: str = _setting("prefill_first", "prefill_first (nano-vllm; measured faster) | mixed (vLLM v1)")
    attention_backend: str = _setting("auto", "auto | torch | triton | flash_attn")
    block_size: int = _setting(16, "tokens per KV block")
    seed: int = _setting(0, "global seed")
    tokenizer: str | None = _setting(None, "tokenizer directory (default: the model's)")
    # -- where the ranks run (nanovllm_ray.executor.make_executor reads these, and nothing else decides it)
    executor: str = _setting("auto", "inprocess (one rank, in the engine's process) | ray (a Ray actor per rank) | "
                                     "auto: in-process for one rank, actors for more")
    dispatch: str = _setting("auto", "how the driver sends each step to rank actors: compiled (a Ray compiled "
                                     "graph; each rank spins a CPU core while it waits) | remote (actor calls) | "
                                     "auto: compiled for GPU ranks, remote for CPU ranks")
    worker_num_cpus: float = _setting(1.0, "CPUs of each rank actor's placement-group bundle")
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ConfigError(f"model directory {self.model!r} does not exist")
        cfg_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"model directory {self.model!r} has no config.json: not a Hugging Face checkpoint")
        if not self.hf_config:  # a Config passed to another process keeps what was read here
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
        _check(self.prefill_graph_tokens >= 0, f"prefill_graph_tokens={self.prefill_graph_tokens} must be >= 0")
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
        _check(self.executor in ("auto", "inprocess", "ray"),
               f"executor={self.executor!r} must be auto, inprocess or ray")
        _check(not (self.executor == "inprocess" and tp > 1),
               f"executor='inprocess' runs one rank; tensor_parallel_size={tp} needs 'ray' (or auto)")
        _check(self.dispatch in ("auto", "compiled", "remote"),
               f"dispatch={self.dispatch!r} must be auto, compiled or remote")
        _check(self.worker_num_cpus > 0, f"worker_num_cpus={self.worker_num_cpus} must be > 0")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> Config:
        known = {f.name for f in fields(cls)} - {"hf_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(model=model, **kwargs)

    @classmethod
    def settings(cls) -> list[tuple[str, Any, Any, str]]:
        """(name, type, default, help) of every engine setting (the model excepted), for the app args and CLIs."""
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name], f.default, f.metadata["help"]) for f in fields(cls)
                if f.metadata.get("help") and f.default is not MISSING]

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed, checked again."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_config"}
        return Config(**{**values, **changes}, hf_config=dict(self.hf_config))

    @classmethod
    def default(cls, name: str) -> Any:
        """A setting's one default (for a caller that holds settings but cannot read the checkpoint)."""
        return cls.__dataclass_fields__[name].default

    @property
    def uses_rank_actors(self) -> bool:
        """Ranks run as Ray actors (else the one rank runs in the engine's process)."""
        return ranks_as_actors(self.executor, self.tensor_parallel_size)

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


def ranks_as_actors(executor: str, tensor_parallel_size: int) -> bool:
    """`executor` auto: one rank in the engine's process, Ray actors for more."""
    return executor == "ray" or (executor == "auto" and tensor_parallel_size > 1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
