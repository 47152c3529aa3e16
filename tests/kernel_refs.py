"""Inputs and the fp32 reference for the Triton attention kernel tests, shared by tests/test_kernels_interpret.py
(interpreted on the CPU) and tests/gpu/test_kernels.py (compiled on the GPU)."""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def reference_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale):
    """fp32 attention of each sequence's queries over its cached context, bottom-right causal mask."""
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    query_start_loc, seq_lens, block_tables = query_start_loc.tolist(), seq_lens.tolist(), block_tables.cpu()
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if seq_len == 0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long().to(q.device)
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)  # [seq_len, H, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        q_pos = seq_len - q_len + torch.arange(q_len, device=q.device)
        s = s.masked_fill(torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, extra_blocks=7):
    """A randomly filled cache and a block table of shuffled block ids padded with -1."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    ids = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(seq_lens), max(max(blocks_per_seq), 1) + 2), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    return k_cache, v_cache, block_tables.to(DEVICE)


def fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as non-contiguous views of one fused projection output, as the model produces them."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
