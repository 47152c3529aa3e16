"""The Triton sampler (kernels/sampling.py), the fused q/k norm + rotary + KV store (kernels/qk_norm_rope.py), the
decode GEMV with its fused norm and SiLU-and-mul (kernels/gemv.py) and the element-wise kernels (kernels/elementwise.py:
RMSNorm with and without the residual add, SiLU-and-mul, the merge of pending tokens) through Triton's interpreter on
the CPU, against the PyTorch ops they replace.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_fused_kernels_interpret.py -q

Importing test_kernels_interpret first sets TRITON_INTERPRET=1 (or skips this module where that cannot work).
"""

import pytest
import torch
from test_kernels_interpret import _patch_interpreter  # noqa: F401  (sets up or skips the interpreter)

from nanovllm_ray.kernels import elementwise, gemv, qk_norm_rope, sampling  # noqa: E402
from nanovllm_ray.layers import ops  # noqa: E402
from nanovllm_ray.layers.attention.torch_ref import store_kvcache_ref  # noqa: E402
from nanovllm_ray.layers.rotary import RotaryEmbedding  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1500, 5000])
def test_greedy_rows_are_argmax_first_index(dtype, vocab):
    torch.manual_seed(0)
    logits = torch.randn(6, vocab).to(dtype)
    logits[1, vocab // 3] = logits[1, vocab - 1] = 50.0  # a tie across tiles / chunks: the first one wins
    logits[2, :] = 0.0  # all equal: index 0
    tokens = sampling.sample_tokens(logits, torch.zeros(6))
    assert tokens.tolist() == logits.float().argmax(-1).tolist()
    assert tokens[1].item() == vocab // 3 and tokens[2].item() == 0


def test_draws_follow_softmax_of_scaled_logits():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    temperature = 0.7
    logits = (probs.log() * temperature).repeat(3000, 1)  # softmax(logits / T) == probs
    seen = torch.zeros(4)
    for _ in range(2):  # the seed advances between calls
        tokens = sampling.sample_tokens(logits, torch.full((3000,), temperature))
        seen += torch.bincount(tokens, minlength=4).float()
    freq = seen / seen.sum()
    assert torch.allclose(freq, probs, atol=0.02), freq


def test_gumbel_noise_keeps_its_precision_in_the_winning_tail():
    """_gumbel(bits) is -log(-log(1 - v)), v = (bits + 1/2) / 2^32, against float64 over the whole range of bits:
    the largest draws (v near 0, where the sampled token comes from) through the series, the rest through the log.
    (The interpreter's log is exact where CUDA's lg2.approx is not; tests/gpu/test_fused_gpu.py checks the draws.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def noise(bits_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, sampling._gumbel(tl.load(bits_ptr + i)))

    small = [0, 1, 7, 2**10, 2**16, 2**20, 2**24, 2**25 - 1, 2**25, 2**25 + 1]  # v = 2^-7 is 2^25
    big = [2**31, 3 * 2**30, 2**32 - 2**20, 2**32 - 256, 2**32 - 1]
    bits = small + big + torch.randint(0, 2**32, (128 - len(small) - len(big),), dtype=torch.int64).tolist()
    out = torch.empty(128)
    noise[(1,)](torch.tensor(bits, dtype=torch.int64).to(torch.uint32), out, BLOCK=128)
    v = (torch.tensor(bits, dtype=torch.float64) + 0.5) / 2**32
    ref = -torch.log(-torch.log1p(-v))
    # 1 - v loses its precision in float32 where v nears 1: E above 4.5, draws that lose (1 in 90), or -inf at the end
    upper = ref > -1.5
    assert torch.allclose(out[upper].double(), ref[upper], rtol=0, atol=1e-5), (out - ref)[upper].abs().max()
    assert ((out[~upper] < -1.4) & ((out[~upper] - ref[~upper]).abs() < 1e-3) | (out[~upper] == float("-inf"))).all()
    assert out.max() > 22  # bits 0: E = 2^-33, finer than a float uniform's 2^-24 steps


def test_vocabulary_slices_at_any_offset_draw_the_whole_vocabulary_token():
    """A token's noise is keyed by its row and id (Philox's four numbers go to an aligned group of four ids), so
    slices cut anywhere, not at multiples of four, merge to the whole vocabulary's draw."""
    from nanovllm_ray.layers.sampler import merge_shard_samples

    torch.manual_seed(3)
    logits = torch.randn(7, 2001) * 0.1  # flat: the noise decides
    temps = torch.full((7,), 0.9)
    temps[2] = 0.0
    seed = sampling._seed(logits.device)
    start = seed.clone()
    whole = sampling.sample_tokens(logits, temps)
    shards = []
    for lo, hi in ((0, 333), (333, 998), (998, 2001)):
        seed.copy_(start)
        val = torch.empty(7)
        idx = sampling.sample_tokens(logits[:, lo:hi].contiguous(), temps, col_offset=lo, out_val=val)
        shards.append(torch.stack([val.double(), idx.double()], -1))
    assert torch.equal(merge_shard_samples(torch.stack(shards)), whole)
    assert whole[2] == logits[2].argmax()


def test_calls_draw_fresh_noise_and_mixed_rows():
    logits = torch.zeros(64, 50)
    temps = torch.ones(64)
    temps[::2] = 0.0  # greedy rows in between
    a = sampling.sample_tokens(logits, temps)
    b = sampling.sample_tokens(logits, temps)
    assert (a[::2] == 0).all() and (b[::2] == 0).all()
    assert not torch.equal(a[1::2], b[1::2])
    out = torch.full((64,), -1, dtype=torch.int32)
    assert sampling.sample_tokens(logits, temps, out=out) is out and (out >= 0).all()


def test_tokens_also_go_to_the_ring_slot_the_header_names():
    """The decode graphs' host ring: the finishing kernel writes each row's token, and the launch number, into the
    slot; the other slots stay as they were."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3000)
    temps = torch.tensor([0.0, 0.7, 0.0, 1.0, 0.0])
    ring = torch.full((4, 9), -1, dtype=torch.int64)
    tokens = sampling.sample_tokens(logits, temps, ring=(torch.tensor([0, 0, 3, 42]), ring))
    assert ring[3, 0] == 42 and ring[3, 1:6].tolist() == tokens.tolist() and ring[3, 6:].tolist() == [-1] * 3
    assert bool((ring[:3] == -1).all()) and tokens[0] == logits[0].argmax()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 32), (6, 3, 16), (16, 8, 128)])
def test_qk_norm_rope_store_matches_unfused_ops(dtype, num_heads, num_kv_heads, head_dim):
    torch.manual_seed(0)
    n, block_size, num_blocks = 5, 4, 6
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q_w, k_w = (1 + 0.1 * torch.randn(head_dim)).to(dtype), (1 + 0.1 * torch.randn(head_dim)).to(dtype)
    cos_sin = RotaryEmbedding(head_dim, 4096, 1_000_000.0).cos_sin_cache
    positions = torch.tensor([0, 7, 100, 3000, 4095])
    slots = torch.tensor([3, -1, 17, 0, 23])
    caches = [torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype) for _ in range(4)]

    q, k = qk_norm_rope.qk_norm_rope_store(qkv, num_heads, num_kv_heads, q_w, k_w, 1e-6, cos_sin, positions,
                                           caches[0], caches[1], slots)
    q_ref, k_ref, v_ref = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q_ref, k_ref = ops.qk_norm_rope(q_ref.reshape(n, num_heads, head_dim), k_ref.reshape(n, num_kv_heads, head_dim),
                                    q_w, k_w, 1e-6, cos_sin, positions)
    store_kvcache_ref(k_ref, v_ref.reshape(n, num_kv_heads, head_dim), caches[2], caches[3], slots)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    torch.testing.assert_close(k.float(), k_ref.float(), **tol)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), **tol)  # slot -1 stored nothing
    assert torch.equal(caches[1], caches[3])  # v is copied as is


def test_qk_norm_rope_without_cache():
    qkv = torch.randn(3, (2 + 2) * 16)
    cos_sin = RotaryEmbedding(16, 64, 10_000.0).cos_sin_cache
    empty = torch.tensor([])
    q, k = qk_norm_rope.qk_norm_rope_store(qkv, 2, 1, torch.ones(16), torch.ones(16), 1e-6, cos_sin,
                                           torch.tensor([1, 2, 3]), empty, empty, torch.tensor([0, 1, 2]))
    assert q.shape == (3, 2, 16) and k.shape == (3, 1, 16) and torch.isfinite(q).all()


def _gemv_reference(x, weight, residual, norm_weight, eps, silu_mul):
    res_out = None
    if norm_weight is not None:
        if residual is not None:
            x, res_out = ops.add_rms_norm(x, residual, norm_weight, eps)
        else:
            x = ops.rms_norm(x, norm_weight, eps)
    y = torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)
    return (ops.silu_and_mul(y) if silu_mul else y), res_out


@pytest.mark.parametrize("M,N,K,config", [(1, 48, 64, None), (1, 42, 1536, None), (1, 42, 2560, "large"),
                                           (2, 48, 64, None), (3, 42, 1536, None), (5, 40, 320, None),
                                           (8, 42, 136, None), (8, 42, 2560, None)])
@pytest.mark.parametrize("fusion", ["plain", "norm", "add_norm", "add_norm_silu"])  # a partial last W slice; K not a
def test_gemv_matches_unfused_ops(M, N, K, config, fusion):  # multiple of BLOCK_K or of 8; 1 row and 2-8
    torch.manual_seed(0)
    dtype, eps = torch.bfloat16, 1e-6
    silu = fusion.endswith("silu")
    x = torch.randn(M, K).to(dtype)
    weight = (torch.randn(2 * N if silu else N, K) / K**0.5).to(dtype)
    residual = torch.randn(M, K).to(dtype) if "add" in fusion else None
    norm_weight = (1 + 0.1 * torch.randn(K)).to(dtype) if "norm" in fusion else None
    override = {"large": gemv.LARGE_CONFIG}.get(config)  # the tiles of weights of 16 MiB and more: K in tiles
    if M > gemv.MAX_ROWS:  # more rows than the engine gives the kernel: the kernel itself takes any count
        override = gemv.rows_config(N, K, silu)
    y, res_out = gemv.gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=eps, silu_mul=silu,
                           config_override=override)
    ref, ref_res = _gemv_reference(x, weight, residual, norm_weight, eps, silu)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = 6e-2 if silu else 2e-2  # the interpreter's roundings toward zero add up over silu's chain of them
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    if residual is None:
        assert res_out is None
    else:
        # the bf16 sum (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: one ulp apart)
        torch.testing.assert_close(res_out.float(), ref_res.float(), atol=0, rtol=2 ** -7)


def test_gemv_takes_small_batches_of_small_half_precision_weights():
    assert gemv.supports(1, 4096, 1024, torch.bfloat16) and gemv.supports(1, 6144, 1024, torch.float16)
    # 2-4 rows where each program's W slice is one tile (qwen3-0.6b's four projections), with the one-row tiles
    assert all(gemv.supports(m, n, k, torch.bfloat16) for m in (2, 3, 4)
               for n, k in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)))
    assert gemv.rows_config(1024, 3072) == gemv.config(1024, 3072) and gemv.rows_config(1024, 8192) is None
    assert not gemv.supports(2, 1024, 8192, torch.bfloat16)  # K past MAX_ONE_TILE_K: in tiles, one row only
    assert not gemv.supports(5, 1024, 2048, torch.bfloat16)  # batches of more rows stay on cuBLAS / the skinny GEMM
    assert not gemv.supports(2, 3072, 4096, torch.bfloat16)  # as do 16 MiB weights and more at more than one row
    assert not gemv.supports(1, 4096, 1024, torch.float32)
    assert not gemv.supports(1, 4096, 1020, torch.bfloat16)  # rows not 16-byte aligned
    assert not gemv.supports(1, 6144, 4096, torch.bfloat16)  # qwen3-8b's QKV: 48 MiB, cuBLAS measured faster
    assert not gemv.supports(1, 4096, 4096, torch.bfloat16)  # its o_proj: 32 MiB, the same
    assert not gemv.supports(1, 4096, 6144, torch.bfloat16)  # its down_proj at tp=2: 48 MiB
    # Its QKV and o_proj at tp=2 (24 and 16 MiB) measured faster with the large weights' tiles than on cuBLAS.
    assert gemv.supports(1, 3072, 4096, torch.bfloat16) and gemv.supports(1, 4096, 2048, torch.bfloat16)
    assert gemv.config(3072, 4096) == gemv.config(4096, 2048) == gemv.LARGE_CONFIG
    assert gemv.config(4096, 1024) != gemv.LARGE_CONFIG  # qwen3-0.6b's QKV (8 MiB): the tuned small tiles
    # its o_proj, gate/up and down: each program's whole W slice in one tile; past MAX_ONE_TILE_K, tiles of K
    assert [gemv.config(*shape)["BLOCK_K"] for shape in ((1024, 2048), (3072, 1024, True), (1024, 3072))] == [
        2048, 1024, 4096]
    assert gemv.config(2048, 6144)["BLOCK_K"] == 1024


# The element-wise kernels (kernels/elementwise.py) against the plain ops. fp32 matches up to the order of the sum of
# squares; bf16 differs where the interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest): up to one
# ulp a rounding, three roundings in the norm's chain (measured up to 2.8 ulps), two in SiLU-and-mul's (2.0).
BF16_ULP = 2**-7  # relative, at most


def _rows_of(n, width, dtype, strided):
    """[n, width] of dtype, contiguous or a view with a row stride past width (and an offset start)."""
    if strided:
        return torch.randn(n, width + 24).to(dtype)[:, 3:width + 3]
    return torch.randn(n, width).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 1000, 1024])
@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_matches_plain_op(dtype, hidden, n, add, strided):
    torch.manual_seed(0)
    eps = 1e-6
    x = _rows_of(n, hidden, dtype, strided)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    if add:
        residual = torch.randn(n, hidden).to(dtype)
        out, res_out = elementwise.add_rms_norm(x, residual, weight, eps)
        ref, ref_res = ops._PLAIN["add_rms_norm"](x, residual, weight, eps)
        assert res_out.shape == ref_res.shape and res_out.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(res_out, ref_res)
        else:
            torch.testing.assert_close(res_out, ref_res, atol=0, rtol=BF16_ULP)
    else:
        out, ref = elementwise.rms_norm(x, weight, eps), ops._PLAIN["rms_norm"](x, weight, eps)
    assert out.shape == ref.shape == (n, hidden) and out.dtype == ref.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 4 * BF16_ULP}
    torch.testing.assert_close(out, ref, **tol)


def test_rms_norm_of_heads_and_of_an_fp32_weight():
    """qk_norm_rope's per-head norm: q [n, heads, d], a strided view of the QKV rows; and a weight of another dtype
    than x (the product takes the wider one, as in PyTorch)."""
    torch.manual_seed(0)
    n, heads, d = 5, 6, 128
    qkv = torch.randn(n, (heads + 4) * d)
    q = qkv[:, :heads * d].view(n, heads, d)
    weight = 1 + 0.1 * torch.randn(d)
    torch.testing.assert_close(elementwise.rms_norm(q, weight, 1e-6), ops._PLAIN["rms_norm"](q, weight, 1e-6),
                               atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 64).bfloat16()
    out, ref = elementwise.rms_norm(x, weight[:64], 1e-6), ops._PLAIN["rms_norm"](x, weight[:64], 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=BF16_ULP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [96, 1000, 1536])  # 1536: two column blocks, the last one partial
@pytest.mark.parametrize("n", [0, 1, 5])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul_matches_plain_op(dtype, inter, n, strided):
    torch.manual_seed(0)
    x = 3 * _rows_of(n, 2 * inter, dtype, strided)
    out, ref = elementwise.silu_and_mul(x), ops._PLAIN["silu_and_mul"](x)
    assert out.shape == ref.shape == (n, inter) and out.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 3 * BF16_ULP}
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("n", [0, 1, 5, 300])  # 300: two programs
@pytest.mark.parametrize("src_dtype", [torch.int64, torch.int32])
def test_merge_pending_matches_plain_op(n, src_dtype):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (n,))
    tokens = torch.randint(1000, 2000, (max(n, 1) + 3,))
    src = torch.randint(-1, tokens.shape[0], (n,), dtype=src_dtype)
    src[::2] = -1
    out, ref = elementwise.merge_pending(input_ids, src, tokens), ops._PLAIN["merge_pending"](input_ids, src, tokens)
    assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("bs, n, width", [(1, 1, 3), (8, 5, 40), (16, 0, 0), (4, 4, 300)])  # 300: two column blocks
def test_decode_inputs_unpacks_the_step_and_matches_plain_op(bs, n, width):
    """A decode graph's first kernel: the merged ids, and rows < n of the block tables from the compact rows; rows past
    n and columns past the width keep what they held."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (bs,))
    tokens = torch.randint(1000, 2000, (bs + 3,))
    src = torch.randint(-1, tokens.shape[0], (bs,))
    src[::2] = -1
    header = torch.tensor([n, width, 2, 7])
    step_tables = torch.randint(0, 10_000, (n, width), dtype=torch.int32)
    compact = torch.full((bs * 320,), -5, dtype=torch.int32)
    compact[:n * width] = step_tables.flatten()
    before = torch.randint(0, 10_000, (bs + 2, 320), dtype=torch.int32)
    embed = torch.randn(2000, 48).bfloat16()
    outs = []
    for fn in (elementwise.decode_inputs, ops._PLAIN["decode_inputs"]):
        tables = before.clone()
        outs.append((*fn(input_ids, src, tokens, header, compact, tables, embed), tables))
        assert fn(input_ids, src, tokens, header, compact, tables.clone())[1] is None  # no embedding asked
    (ids, hidden, tables), (ref_ids, ref_hidden, ref_tables) = outs
    assert torch.equal(ids, ref_ids) and torch.equal(ids, ops._PLAIN["merge_pending"](input_ids, src, tokens))
    assert torch.equal(hidden, ref_hidden) and torch.equal(hidden, embed[ids])
    assert torch.equal(tables, ref_tables)
    assert torch.equal(tables[:n, :width], step_tables)
    assert torch.equal(tables[n:], before[n:]) and torch.equal(tables[:, width:], before[:, width:])


def test_store_tokens_writes_the_slot_and_launch_number():
    tokens = torch.arange(300) * 3
    ring = torch.full((4, 301), -1, dtype=torch.int64)
    elementwise.store_tokens(tokens[:300], torch.tensor([5, 9, 2, 14]), ring)
    assert ring[2, 0] == 14 and torch.equal(ring[2, 1:301], tokens)
    assert bool((ring[[0, 1, 3]] == -1).all())
    elementwise.store_tokens(tokens[:3], torch.tensor([3, 0, 1, 15]), ring)
    assert ring[1].tolist()[:5] == [15, 0, 3, 6, -1]


def test_enable_triton_ops_swaps_the_elementwise_ops_and_back():
    names = ("rms_norm", "add_rms_norm", "silu_and_mul", "merge_pending", "decode_inputs")
    x, w = torch.randn(3, 64), torch.ones(64)
    try:
        ops.enable_triton_ops(True, fused_gemv=False, head_dim_supported=False)
        assert all(getattr(ops, name) is not ops._PLAIN[name] for name in names)
        assert ops.qk_norm_rope_store is None and ops.skinny_gemm is None and ops.gemv is None
        assert ops.store_tokens is elementwise.store_tokens
        assert torch.equal(ops.rms_norm(x, w, 1e-6), ops._PLAIN["rms_norm"](x, w, 1e-6))  # CPU tensors: plain
        ops.enable_triton_ops(True)
        assert ops.qk_norm_rope_store is not None and ops.skinny_gemm is not None and ops.gemv is not None
    finally:
        ops.enable_triton_ops(False)
    assert all(getattr(ops, name) is ops._PLAIN[name] for name in names)
    assert ops.qk_norm_rope_store is None and ops.skinny_gemm is None and ops.gemv is None and ops.store_tokens is None


# ---------------------------------------------------------------------------------------------------------------------
# the sentinel all-reduce (kernels/allreduce_norm.py), two ranks simulated in one process
# ---------------------------------------------------------------------------------------------------------------------


def _lamport_rank(rank: int, buffers: list[torch.Tensor], hidden: int, max_rows: int, programs: int):
    """Rank `rank`'s LamportAllReduce over CPU buffers: what __init__ sets up, without symmetric memory."""
    from nanovllm_ray.kernels.allreduce_norm import LamportAllReduce, peer_offsets

    fast = LamportAllReduce.__new__(LamportAllReduce)
    fast.hidden, fast.max_rows, fast.dtype = hidden, max_rows, torch.bfloat16
    fast.world_size, fast.rank, fast.programs, fast.block_h = len(buffers), rank, programs, 64
    fast.buffer, fast.calls = buffers[rank], torch.zeros(programs, dtype=torch.int32)
    fast.peer_offs = peer_offsets([b.data_ptr() for b in buffers], buffers[rank])
    return fast


@pytest.mark.parametrize("norm", [True, False])
def test_lamport_all_reduce_two_ranks_in_turn(norm):
    """Rank 1's push is written by hand into rank 0's buffer; rank 0's call then sums, restores the sentinels it
    read and pushes its rows into rank 1's buffer, so rank 1's call completes too. Both calls give the sum (with the
    residual add and RMSNorm) of the plain ops, the same bits on both ranks; -0.0 arrives as +0.0; the second call
    uses the other slot. Within one bf16 rounding: the interpreter casts float32 to bf16 by truncation
    (tests/gpu/test_all_reduce_gpu.py checks the bits)."""
    from nanovllm_ray.kernels.allreduce_norm import SENTINEL

    hidden, max_rows, n, world = 48, 5, 4, 2
    sentinel = SENTINEL.value
    buffers = [torch.full((2 * world * max_rows * hidden,), sentinel, dtype=torch.int16) for _ in range(world)]
    ranks = [_lamport_rank(r, buffers, hidden, max_rows, programs=3) for r in range(world)]
    weight = torch.rand(hidden).bfloat16()

    def region(buf, slot, sender):
        return buf.view(2, world, max_rows, hidden)[slot, sender, :n]

    for call in range(2):
        torch.manual_seed(call)
        xs = [torch.randn(n, hidden).bfloat16() for _ in range(world)]
        xs[0][0, :5] = -0.0
        xs[1][0, :3] = -0.0  # both -0.0: the sum is +0.0 on every rank
        residual = torch.randn(n, hidden).bfloat16()
        pushed = xs[1].view(torch.int16).clone()
        pushed[pushed == sentinel] = 0
        region(buffers[0], call % 2, 1).copy_(pushed)  # rank 1's push, by hand
        outs = []
        for r in range(world):
            x = xs[r].clone()
            outs.append(ranks[r].add_rms_norm(x, residual, weight, 1e-6) if norm else (ranks[r].all_reduce_(x),))
            if r == 0:  # rank 0 read rank 1's rows, put the sentinels back, and pushed its own
                assert bool((buffers[0] == sentinel).all())
                got = region(buffers[1], call % 2, 0)
                assert bool((got != sentinel).all()) and got[0, :5].tolist() == [0] * 5
        buffers[0].fill_(sentinel)  # rank 1's call pushed again into rank 0's buffer: its next push is by hand
        assert bool((buffers[1] == sentinel).all())
        total = (xs[0].float() + xs[1].float()).bfloat16()
        if norm:
            want, want_res = ops.add_rms_norm(total, residual, weight, 1e-6)
            for got, got_res in outs:
                assert torch.allclose(got_res.float(), want_res.float(), rtol=2 ** -6, atol=2 ** -5)
                assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
            assert torch.equal(outs[0][0], outs[1][0])
        else:
            assert all(torch.allclose(o[0].float(), total.float(), rtol=2 ** -7, atol=0) for o in outs)
            assert torch.equal(outs[0][0], outs[1][0])
            assert outs[0][0][0, :3].view(torch.int16).tolist() == [0, 0, 0]  # +0.0, not -0.0
    assert all(r.calls.tolist() == [2, 2, 2] for r in ranks)
