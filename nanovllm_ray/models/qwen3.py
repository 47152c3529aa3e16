"""Qwen3 (dense), module and parameter names mirroring Hugging Face's Qwen3ForCausalLM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm_ray.layers import ops
from nanovllm_ray.layers.attention import Attention, AttentionMetadata
from nanovllm_ray.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm_ray.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, norm_linear
from nanovllm_ray.layers.norm import RMSNorm
from nanovllm_ray.layers.parallel import tp_size
from nanovllm_ray.layers.rotary import RotaryEmbedding


def rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind != "default":
        raise NotImplementedError(f"rope scaling {kind!r} is not supported (only plain rotary embeddings)")
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 1_000_000.0)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        tp = tp_size()
        hidden = cfg["hidden_size"]
        total_heads = cfg["num_attention_heads"]
        total_kv = cfg.get("num_key_value_heads", total_heads)
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        self.num_heads = total_heads // tp
        self.num_kv_heads = max(1, total_kv // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = cfg.get("attention_bias", False)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv, bias=bias)
        # Its sum over ranks happens in the post-attention norm, with the residual add.
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=bias, reduce=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.get("max_position_embeddings", 40960), rope_theta(cfg))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(x + residual); returns o_proj's output (partial sums over the ranks), the residual."""
        n = x.shape[0]
        qkv, residual = norm_linear(x, residual, norm, self.qkv_proj)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if ops.qk_norm_rope_store is not None and qkv.is_cuda:  # one kernel, KV stored
            q, k = ops.qk_norm_rope_store(qkv, self.num_heads, self.num_kv_heads, self.q_norm.weight,
                                          self.k_norm.weight, self.q_norm.eps, self.rotary_emb.cos_sin_cache,
                                          positions, self.attn.k_cache, self.attn.v_cache, meta.slot_mapping)
            o = self.attn(q, k, v, meta, kv_stored=self.attn.k_cache.numel() > 0)
        else:
            q, k = ops.qk_norm_rope(q.view(n, self.num_heads, self.head_dim),
                                    k.view(n, self.num_kv_heads, self.head_dim), self.q_norm.weight,
                                    self.k_norm.weight, self.q_norm.eps, self.rotary_emb.cos_sin_cache, positions)
            o = self.attn(q, k, v, meta)
        return self.o_proj(o.reshape(n, self.q_size)), residual


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter])
        self.down_proj = RowParallelLinear(inter, hidden, reduce=False)  # summed in the next layer's input norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """down(silu(gate) * up) of norm(x + residual); returns it (partial sums over the ranks) and the residual."""
        h, residual = norm_linear(x, residual, norm, self.gate_up_proj, silu_mul=True)
        return self.down_proj(h), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the embeddings (residual None) or the previous layer's MLP output as partial sums over the ranks;
        returns this layer's MLP output as partial sums (each norm all-reduces the sums before it)."""
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm, meta)
        return self.mlp(x, residual, self.post_attention_layernorm)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """embeds: input_ids' embeddings, looked up already (a decode graph's first kernel does so at one rank)."""
        x, residual = self.embed_tokens(input_ids) if embeds is None else embeds, None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual, reduce=True)
        return x


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = Qwen3Model(cfg)
        self.lm_head = ParallelLMHead(cfg["vocab_size"], cfg["hidden_size"])
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)
