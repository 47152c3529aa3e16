"""The Triton kernels (KV cache, attention, GEMM) against a PyTorch reference, compiled for the GPU.

The same checks as tests/test_kernels_interpret.py on realistic shapes and dtypes. Triton and the kernels are imported
inside a fixture, never at collection time, so that a CPU-only session can still interpret them in the other module.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_refs import cumulative, fused_qkv_views, make_cache, reference_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels are interpreted"),
]

DEVICE = "cuda"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import kv_store, paged_attention

    return kv_store, paged_attention


@pytest.fixture(scope="module")
def skinny():
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import skinny_gemm

    return skinny_gemm


# ---------------------------------------------------------------------------------------------------------------------
# Inputs (the reference and the cache/query makers are in tests/kernel_refs.py)
# ---------------------------------------------------------------------------------------------------------------------


def capture(run):
    """Run `run` once on a side stream (JIT compiles, one-time buffers), then capture it in a CUDA graph; returns the
    graph and what the captured call returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


GQA = [(8, 8), (16, 8), (32, 8), (32, 4)]  # (num_heads, num_kv_heads): ratios 1, 2, 4, 8
DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads,head_dim", [(8, 128), (2, 32), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kvcache(kernels, num_kv_heads, head_dim, dtype, slot_dtype):
    kv_store, _ = kernels
    torch.manual_seed(0)
    num_blocks, block_size, num_tokens = 20, 16, 100
    _, k, v = fused_qkv_views(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::7] = -1  # padding tokens
    kv_store.store_kvcache(k, v, k_cache, v_cache, slots.to(slot_dtype))

    expected_k, expected_v = k_before.flatten(0, 1), v_before.flatten(0, 1)
    keep = slots >= 0
    expected_k[slots[keep]] = k[keep]
    expected_v[slots[keep]] = v[keep]
    torch.testing.assert_close(k_cache.flatten(0, 1), expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache.flatten(0, 1), expected_v, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_reference(kernels, num_heads, num_kv_heads, head_dim, block_size, dtype):
    _, attn = kernels
    torch.manual_seed(1)
    seq_lens = [1, 17, 255, 257, 1000, 64, 2049]
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q, _, _ = fused_qkv_views(len(seq_lens), num_heads, num_kv_heads, head_dim, dtype)
    lens = int32(seq_lens)
    scale = head_dim**-0.5
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * len(seq_lens)), lens, block_tables, scale)
    tol = TOLERANCE[dtype]
    for chunk in (10**6, 64, 100, 128, None):  # unsplit, one-tile chunks, off the tile, 128-token, the plan's
        out = attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale, chunk=chunk)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=0, msg=f"chunk={chunk}")


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 64, 300])
def test_decode_chunked_and_unsplit_agree(kernels, num_seqs):
    """The plan's chunks (each regime: one-tile chunks, ~4 programs a SM, about one chunk a sequence with 64- and
    128-token tiles) against whole sequences."""
    _, attn = kernels
    torch.manual_seed(2)
    seq_lens = torch.randint(1, 1500, (num_seqs,)).tolist()
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 8, 128, torch.bfloat16)
    q = torch.randn(num_seqs, 32, 128, device=DEVICE).to(torch.bfloat16)
    lens = int32(seq_lens)
    no_split = attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5, chunk=10**6)
    planned = attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5)
    torch.testing.assert_close(planned.float(), no_split.float(), atol=1e-2, rtol=0)
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * num_seqs), lens, block_tables, 128**-0.5)
    torch.testing.assert_close(no_split.float(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("chunk", [10**6, 64])
def test_decode_padding_rows_give_zeros(kernels, chunk):
    """seq_len 0 rows (block table all -1) give zeros, not NaN; `out` is written in place."""
    _, attn = kernels
    torch.manual_seed(3)
    seq_lens = [40, 0, 300, 0]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 32, torch.float32)
    q = torch.randn(4, 8, 32, device=DEVICE)
    lens = int32(seq_lens)
    out = torch.full_like(q, float("nan"))
    result = attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.2, out=out, chunk=chunk)
    assert result is out
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 4), lens, block_tables, 0.2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_seqs,chunk", [(4, 64), (64, None), (300, None)])
def test_decode_no_stale_partials(kernels, num_seqs, chunk):
    """Back-to-back launches on alternating inputs, no syncs: the partial buffers come back from the caching allocator
    holding the other input's values, so a merge that read them before the chunks' stores were visible would differ.
    The merge order is fixed by chunk index, so every result must repeat bit for bit. One-tile chunks at batch 4, and
    the plan's at 64 and 300 (64- and 128-token tiles)."""
    _, attn = kernels
    torch.manual_seed(11)
    seq_lens = torch.randint(1, 4096, (num_seqs,)).tolist()
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 8, 128, torch.bfloat16)
    lens = int32(seq_lens)
    host = attn.decode_plan(seq_lens, 8, torch.device(DEVICE), chunk=chunk)
    assert host[1] > num_seqs  # some sequence is split
    plan = torch.from_numpy(host).to(DEVICE)
    queries = [torch.randn(num_seqs, 16, 128, device=DEVICE).to(torch.bfloat16) for _ in range(2)]

    def run(q):
        return attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5, plan=plan)

    firsts = [run(q) for q in queries]
    for q, first in zip(queries, firsts):
        qsl = cumulative([1] * num_seqs)
        expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 128**-0.5)
        torch.testing.assert_close(first.float(), expected, atol=2e-2, rtol=0)
    outs = [run(queries[i % 2]) for i in range(200)]
    for i, out in enumerate(outs):
        assert torch.equal(out, firsts[i % 2]), f"launch {i}"


@pytest.mark.parametrize("num_seqs", [1, 4, 16, 64, 256])
def test_decode_plan_cuda_graph(kernels, num_seqs):
    """As the engine runs it: captured once with a plan buffer of the batch size's plan_size, then replayed with new
    lengths, block tables and the plan made for them written into the same buffers (each input replayed twice)."""
    _, attn = kernels
    torch.manual_seed(12)
    max_len, block_size = 4096, 16
    max_blocks = max_len // block_size
    device = torch.device(DEVICE)
    k_cache, v_cache, _ = make_cache([max_len] * min(num_seqs, 16), block_size, 8, 128, torch.bfloat16)
    q = torch.randn(num_seqs, 16, 128, device=DEVICE).to(torch.bfloat16)
    lens = torch.ones(num_seqs, dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=DEVICE)
    plan = torch.from_numpy(attn.decode_plan([1] * num_seqs, 8, device)).to(DEVICE)
    assert plan.numel() == attn.plan_size(num_seqs, 8, device)
    out = torch.empty_like(q)
    run = lambda: attn.paged_decode_attention(  # noqa: E731
        q, k_cache, v_cache, tables, lens, 128**-0.5, out=out, plan=plan
    )
    graph, _ = capture(run)

    choices = [0, 1, 5, 64, 65, 640, 641, 2000, max_len]
    for _ in range(3):
        new_lens = torch.tensor(choices)[torch.randint(len(choices), (num_seqs,))].to(torch.int32)
        new_lens[0] = 640  # the measured case
        lens.copy_(new_lens)
        plan.copy_(torch.from_numpy(attn.decode_plan(new_lens.tolist(), 8, device)))
        tables.copy_(torch.randint(k_cache.shape[0], (num_seqs, max_blocks), dtype=torch.int32))
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        graph.replay()
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)
        expected = reference_attention(q, k_cache, v_cache, cumulative([1] * num_seqs), lens, tables, 128**-0.5)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------------------

# (q_lens, seq_lens) per batch: plain prefill, cached prefix (q shorter than k), decode-like rows, mixed lengths.
PREFILL_BATCHES = [
    ([7, 130, 1, 33], [7, 257, 1000, 33]),
    ([1, 7, 33, 130, 300], [1, 17, 255, 1000, 1300]),
]


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", range(len(PREFILL_BATCHES)))
def test_prefill_matches_reference(kernels, num_heads, num_kv_heads, head_dim, block_size, dtype, batch):
    _, attn = kernels
    torch.manual_seed(5)
    q_lens, seq_lens = PREFILL_BATCHES[batch]
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q, _, _ = fused_qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype)
    qsl, lens = cumulative(q_lens), int32(seq_lens)
    scale = head_dim**-0.5
    out = attn.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, max(q_lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, scale)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(40, 8), (12, 4), (64, 8)])  # groups 5, 3, 8 (Qwen3-14B/32B)
def test_prefill_and_decode_other_groups(kernels, num_heads, num_kv_heads):
    _, attn = kernels
    torch.manual_seed(6)
    q_lens, seq_lens = [100, 1, 17], [612, 90, 17]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, num_kv_heads, 128, torch.bfloat16)
    q, _, _ = fused_qkv_views(sum(q_lens), num_heads, num_kv_heads, 128, torch.bfloat16)
    qsl, lens = cumulative(q_lens), int32(seq_lens)
    out = attn.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 100, 128**-0.5)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 128**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    q = q[:3]
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 3), lens, block_tables, 128**-0.5)
    for chunk in (10**6, 64):
        out = attn.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5, chunk=chunk)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("num_heads", [8, 32])
def test_prefill_diagonal_at_tile_edges(kernels, num_heads):
    """Prefixes around multiples of the KV tile, where the unmasked/masked tile boundary moves."""
    _, attn = kernels
    torch.manual_seed(9)
    prefixes = [p for base in (64, 128, 256) for p in range(base - 3, base + 3)]
    q_lens = [3] * len(prefixes) + [130, 129]
    seq_lens = [prefix + 3 for prefix in prefixes] + [258, 257]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 8, 64, torch.float32)
    q = torch.randn(sum(q_lens), num_heads, 64, device=DEVICE)
    qsl, lens = cumulative(q_lens), int32(seq_lens)
    out = attn.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 130, 0.125)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_long_prefill_fp16(kernels):
    _, attn = kernels
    torch.manual_seed(7)
    q_lens, seq_lens = [4096, 1500], [4096, 2000]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 8, 128, torch.float16)
    q, _, _ = fused_qkv_views(sum(q_lens), 16, 8, 128, torch.float16)
    qsl, lens = cumulative(q_lens), int32(seq_lens)
    out = attn.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 4096, 128**-0.5)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 128**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=5e-3, rtol=0)


def test_store_then_chunked_prefill_then_decode(kernels):
    """The engine's order of calls: store each chunk's K/V, attend over prefix + chunk, then decode one token."""
    kv_store, attn = kernels
    torch.manual_seed(8)
    num_heads, num_kv_heads, head_dim, block_size = 16, 8, 128, 16
    chunks = [100, 37, 64]
    total = sum(chunks) + 1
    k_cache = torch.zeros(40, block_size, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = torch.randperm(40)[: -(-total // block_size)].to(torch.int32)
    block_table = table[None].to(DEVICE)
    positions = torch.arange(total)
    slot_of = (table[positions // block_size].long() * block_size + positions % block_size).to(DEVICE)

    all_q, all_k, all_v = fused_qkv_views(total, num_heads, num_kv_heads, head_dim, torch.float32)
    k = all_k.repeat_interleave(2, dim=1)
    v = all_v.repeat_interleave(2, dim=1)
    s = torch.einsum("qhd,khd->hqk", all_q, k) * 0.09
    s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)

    start = 0
    for chunk in chunks + [1]:
        end = start + chunk
        kv_store.store_kvcache(all_k[start:end], all_v[start:end], k_cache, v_cache, slot_of[start:end])
        lens = int32([end])
        if chunk > 1:
            out = attn.paged_prefill_attention(
                all_q[start:end], k_cache, v_cache, cumulative([chunk]), lens, block_table, chunk, 0.09
            )
        else:
            out = attn.paged_decode_attention(all_q[start:end], k_cache, v_cache, block_table, lens, 0.09)
        torch.testing.assert_close(out, dense[start:end], atol=1e-4, rtol=0, msg=f"chunk {start}:{end}")
        start = end


# ---------------------------------------------------------------------------------------------------------------------
# Skinny GEMM
# ---------------------------------------------------------------------------------------------------------------------

# (N, K) of a decode step's four linears: qkv_proj, o_proj, gate_up_proj, down_proj.
QWEN3_0_6B_LINEARS = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
QWEN3_8B_LINEARS = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
GEMM_M = [1, 2, 7, 16, 48, 64, 96, 128, 256]
# Configs the benchmark's sweep may pick, beside gemm_config's: split-K, SWAP_AB (wgmma), BLOCK_M 128, 8 warps.
GEMM_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, SWAP_AB=True, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, num_warps=8, num_stages=3),
]


def reference_linear(x, weight, bias=None):
    """fp64, so the reference carries no rounding of its own at K = 12288."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize("N,K", QWEN3_0_6B_LINEARS + QWEN3_8B_LINEARS)
def test_skinny_linear_model_shapes(skinny, N, K):
    torch.manual_seed(20)
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(torch.bfloat16)  # outputs ~N(0, 1)
    for M in GEMM_M:
        x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
        expected = reference_linear(x, weight)
        for config in [None, *GEMM_CONFIGS]:
            out = skinny.skinny_linear(x, weight, config=config)
            assert out.dtype == torch.bfloat16 and out.shape == (M, N)
            torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2, msg=f"M={M} config={config}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(1072, 1000), (4096, 1024)])  # 1072, 1000: partial N slice, masked K tail
def test_skinny_linear_bias_and_dtypes(skinny, dtype, N, K):
    torch.manual_seed(21)
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    tol = TOLERANCE[dtype]
    configs = [None, dict(BLOCK_N=64, BLOCK_K=64, SWAP_AB=True, num_stages=3), dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=4)]
    for M in (1, 5, 100):
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        for config in configs:  # tiles small enough for fp32's shared memory
            for b in (None, bias):
                out = skinny.skinny_linear(x, weight, b, config=config)
                assert out.dtype == dtype and out.shape == (M, N)
                msg = f"M={M} config={config} bias={b is not None}"
                torch.testing.assert_close(out.float(), reference_linear(x, weight, b), atol=tol, rtol=tol, msg=msg)


def test_skinny_linear_split_k_is_deterministic(skinny):
    torch.manual_seed(22)
    weight = torch.randn(1024, 3072, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(8, 3072, device=DEVICE).to(torch.bfloat16)
    config = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=8)
    first = skinny.skinny_linear(x, weight, config=config)
    for _ in range(5):
        assert torch.equal(skinny.skinny_linear(x, weight, config=config), first)


@pytest.mark.parametrize("config", [None, dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=4)])
def test_skinny_linear_cuda_graph_replay(skinny, config):
    """Captured once, replayed with new inputs written into the same buffer: equal to eager, bit for bit."""
    torch.manual_seed(23)
    M, N, K = 8, 1024, 2048
    weight = (torch.randn(N, K, device=DEVICE) / K**0.5).to(torch.bfloat16)
    bias = torch.randn(N, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    run = lambda: skinny.skinny_linear(x, weight, bias, config=config)  # noqa: E731
    graph, out = capture(run)

    for _ in range(3):
        x.copy_(torch.randn(M, K, device=DEVICE))
        graph.replay()
        eager = run()
        assert torch.equal(out, eager)
        torch.testing.assert_close(out.float(), reference_linear(x, weight, bias), atol=1e-2, rtol=1e-2)
