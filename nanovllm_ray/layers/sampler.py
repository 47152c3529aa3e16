"""Batched sampling: temperature, top-k, top-p, min-p, per-request seeds, and logprobs.

Sampling is an exponential race (argmax of p / E with E ~ Exp(1)), which draws from p without a CPU sync. A
seeded request draws its noise from a generator seeded by (seed, position), so its tokens do not depend on
what else is in the batch or on preemptions.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm_ray.layers import ops

HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters of a step, on the logits' device."""

    temperatures: torch.Tensor  # [n] float32; 0 = greedy
    top_ks: torch.Tensor  # [n] int64; vocab size = off
    top_ps: torch.Tensor  # [n] float32; 1 = off
    min_ps: torch.Tensor  # [n] float32; 0 = off
    seeds: list[int | None]  # per row: None = the global generator
    positions: list[int]  # per row: the position of the token being sampled (seeds the per-row noise)
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_logprobs: int | None  # None: no logprobs this step

    @property
    def plain(self) -> bool:
        """Temperature only: no filters, no per-request seeds."""
        return not (self.any_top_k or self.any_top_p or self.any_min_p) and all(s is None for s in self.seeds)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64
    logprobs: torch.Tensor | None = None  # [n] chosen-token logprob
    top_ids: torch.Tensor | None = None  # [n, k]
    top_logprobs: torch.Tensor | None = None  # [n, k]


def apply_filters(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled logits [n, vocab] with tokens outside top-k / top-p / min-p set to -inf."""
    temps = torch.where(t.temperatures > 0, t.temperatures, torch.ones_like(t.temperatures))
    logits = logits / temps.unsqueeze(1)
    if t.any_min_p:
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * t.min_ps.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if t.any_top_k or t.any_top_p:
        sorted_logits, order = logits.sort(-1, descending=True)
        vocab = logits.shape[-1]
        if t.any_top_k:
            ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
            sorted_logits = sorted_logits.masked_fill(ranks >= t.top_ks.unsqueeze(1), float("-inf"))
        if t.any_top_p:
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass (keep at least one)
            mass_before = probs.cumsum(-1) - probs
            sorted_logits = sorted_logits.masked_fill(mass_before >= t.top_ps.unsqueeze(1), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_temperature(logits: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor | None = None,
                       ring: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Temperature-only sampling, no CPU sync (safe inside a CUDA graph): argmax where the temperature is 0, else a
    draw from softmax(logits / T). On CUDA with Triton one kernel reads the logits once; elsewhere torch does it.
    ring (header, host ring; CUDA with Triton only): the tokens also go to the ring slot the header names
    (kernels/elementwise.py, store_tokens)."""
    if logits.is_cuda and HAS_TRITON:
        from nanovllm_ray.kernels.sampling import sample_tokens

        return sample_tokens(logits, temperatures, out=out, ring=ring)
    assert ring is None, "the host ring takes Triton's sampler"
    logits = logits.float()
    temps = temperatures.float()
    drawn = ops.exponential_race(logits, torch.where(temps > 0, temps, 1.0), torch.empty_like(logits).exponential_())
    tokens = torch.where(temps > 0, drawn, logits.argmax(-1))
    return tokens if out is None else out.copy_(tokens)


def sample_temperature_sharded(logits: torch.Tensor, temperatures: torch.Tensor, col_offset: int,
                               gathered: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sample_temperature over a vocabulary split across tensor-parallel ranks, without gathering the logits: each
    rank draws the winner of its slice [n, vocab / tp] (token ids from col_offset), the ranks all-gather the n
    (score, token) pairs into `gathered` [tp * n, 2] float64, and every rank merges them alike into `out` [n]. No CPU
    sync and fixed shapes: safe inside a CUDA graph (CUDA with Triton only)."""
    from nanovllm_ray.kernels.sampling import sample_tokens

    n = logits.shape[0]
    mine = torch.empty(n, 2, dtype=torch.float64, device=logits.device)
    idx = torch.empty(n, dtype=torch.int64, device=logits.device)
    val = torch.empty(n, dtype=torch.float32, device=logits.device)
    sample_tokens(logits, temperatures, out=idx, col_offset=col_offset, out_val=val)
    mine[:, 0], mine[:, 1] = val, idx
    dist.all_gather_into_tensor(gathered, mine)
    return merge_shard_samples(gathered.view(-1, n, 2), out)


def merge_shard_samples(shards: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """shards [tp, n, 2] (score, token id) of each vocabulary slice's winner, slices in token-id order -> the token
    with the highest score [n] int64. Equal scores go to the lower slice, so the lowest token id wins a tie, as
    argmax over the whole vocabulary does (float64 holds every float32 score and token id exactly)."""
    best = shards[:, :, 0].argmax(0)  # the first slice among equal maxima
    tokens = shards[:, :, 1].gather(0, best.unsqueeze(0)).squeeze(0).long()
    return tokens if out is None else out.copy_(tokens)


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """logits: [n, vocab] (any float dtype) -> sampled token ids and, if asked, logprobs of the raw model."""
    if not t.all_greedy and t.plain:  # temperature only: the decode graphs' path (one kernel on CUDA with Triton)
        return _add_logprobs(SamplerOutput(sample_temperature(logits, t.temperatures)), logits, t)
    logits = logits.float()
    if t.all_greedy:
        tokens = logits.argmax(-1)
    else:
        noise = torch.empty_like(logits).exponential_()
        for i, seed in enumerate(t.seeds):
            if seed is not None:
                g = torch.Generator(device=logits.device).manual_seed((seed * 1_000_003 + t.positions[i]) % 2**63)
                noise[i] = torch.empty(logits.shape[1], device=logits.device).exponential_(generator=g)
        if t.any_top_k or t.any_top_p or t.any_min_p:
            tokens = (apply_filters(logits, t).softmax(-1) / noise).argmax(-1)
        else:  # per-request seeds, no filters
            temps = torch.where(t.temperatures > 0, t.temperatures, torch.ones_like(t.temperatures))
            tokens = ops.exponential_race(logits, temps, noise)
        if t.any_greedy:
            tokens = torch.where(t.temperatures > 0, tokens, logits.argmax(-1))
    return _add_logprobs(SamplerOutput(tokens), logits, t)


def _add_logprobs(out: SamplerOutput, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    tokens = out.token_ids
    if t.max_logprobs is not None:
        logprobs = logits.float().log_softmax(-1)
        out.logprobs = logprobs.gather(-1, tokens.unsqueeze(1)).squeeze(1)
        if t.max_logprobs > 0:
            out.top_logprobs, out.top_ids = logprobs.topk(t.max_logprobs, -1)
    return out


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        return sample(logits, t)
