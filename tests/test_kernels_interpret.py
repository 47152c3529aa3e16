"""The Triton kernels (KV cache, attention, GEMM) against a PyTorch reference, on the CPU through Triton's interpreter.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_kernels_interpret.py -q

Skipped when Triton is not installed (CI). TRITON_INTERPRET=1 must be set before Triton is imported: Triton decorates
its own library functions (tl.cdiv, ...) at import time, so one process cannot both interpret and compile kernels.
Without the variable this module sets it itself, unless a GPU is present (tests/gpu/test_kernels.py then compiles the
real kernels in this process) or Triton is already imported; tests/gpu/test_kernels.py skips when it is set.
"""

import os
import sys

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu/test_kernels.py runs the compiled kernels", allow_module_level=True)
    if "triton" in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kernel_refs import cumulative, fused_qkv_views, make_cache, reference_attention  # noqa: E402

from nanovllm_ray.kernels import kv_store, paged_attention, skinny_gemm  # noqa: E402


def _patch_interpreter() -> None:
    """Work around two bugs of Triton 3.6's interpreter (test-only; compiled kernels are unaffected).

    - Scalars become Python ints through int(1-element array), an error since numpy 2.4; that breaks
      `for i in range(start, end)` with loaded bounds. Index through .item() instead.
    - tl.dot multiplies bf16 operands as their raw uint16 bit patterns. Widen them to fp32 first.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_nanovllm_patched", False):
        return
    interpreter._nanovllm_patched = True
    patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    create_dot = interpreter.InterpreterBuilder.create_dot

    def _widen(handle):
        if handle.dtype.is_bf16():
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
        return handle

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = _create_dot


_patch_interpreter()

ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (3, 16), (2, 32)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kvcache(num_kv_heads, head_dim, slot_dtype):
    torch.manual_seed(0)
    num_blocks, block_size, num_tokens = 5, 16, 9
    _, k, v = fused_qkv_views(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, torch.float32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[1, 4, 8]] = -1  # padding tokens
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

GQA = [(2, 2), (4, 2), (8, 2), (16, 2)]  # (num_heads, num_kv_heads): ratios 1, 2, 4, 8


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize(
    "head_dim,block_size,seq_lens",
    [(16, 16, [1, 17, 255, 257]), (32, 32, [1000, 3, 64]), (32, 256, [257, 1, 17])],
)
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, block_size, seq_lens):
    torch.manual_seed(1)
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, torch.float32)
    q, _, _ = fused_qkv_views(len(seq_lens), num_heads, num_kv_heads, head_dim, torch.float32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * len(seq_lens)), lens, block_tables, scale)
    for num_splits in (1, 3, None):
        out = paged_attention.paged_decode_attention(
            q, k_cache, v_cache, block_tables, lens, scale, num_splits=num_splits
        )
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=f"num_splits={num_splits}")


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_rows_and_out_buffer(num_splits):
    """seq_len 0 rows (CUDA-graph padding, block table all -1) give zeros, not NaN; `out` is written in place."""
    torch.manual_seed(2)
    seq_lens = [40, 0, 300, 0]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
    q = torch.randn(4, 4, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    result = paged_attention.paged_decode_attention(
        q, k_cache, v_cache, block_tables, lens, 0.25, out=out, num_splits=num_splits
    )
    assert result is out
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 4), lens, block_tables, 0.25)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_choose_num_splits():
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert paged_attention.choose_num_splits(32, 8, 4096, cpu) == 1  # enough programs already
    assert paged_attention.choose_num_splits(1, 8, 50, cpu) == 1  # too short to split
    assert paged_attention.choose_num_splits(1, 8, 512, cpu) == 8  # one 64-token tile per split
    assert paged_attention.choose_num_splits(8, 8, 4096, cpu) == paged_attention.MAX_SPLITS  # batch 1-8: all
    assert paged_attention.choose_num_splits(16, 8, 4096, cpu) == 5  # ~4 programs per SM
    assert paged_attention.choose_num_splits(1, 1, 10**6, cpu) == paged_attention.MAX_SPLITS


def test_decode_config_regimes():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert paged_attention.decode_config(2, 128, bf16, 8, cpu)["num_stages"] == 1  # one-tile splits
    assert paged_attention.decode_config(2, 128, bf16, 128, cpu)["BLOCK_N"] == 64
    assert paged_attention.decode_config(2, 128, bf16, 528, cpu)["BLOCK_N"] == 64  # unsplit, one wave
    assert paged_attention.decode_config(2, 128, bf16, 529, cpu)["BLOCK_N"] == 128
    assert paged_attention.decode_config(2, 128, torch.float32, 1024, cpu)["BLOCK_N"] == 32


def _counters_are_zero(device):
    return not paged_attention._ARRIVALS[torch.device(device)][-1].any()


@pytest.mark.parametrize("num_splits", [2, 5, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(4, 2, 16), (10, 2, 32), (8, 1, 256)])  # groups 2, 5, 8
def test_decode_fused_reduce(num_splits, num_heads, num_kv_heads, block_size):
    """Split-KV merged by the last split to arrive (one launch) against the reference and the two-kernel path: a
    seq_len 0 row, a sequence shorter than one split (written directly), some splits empty, every split used."""
    torch.manual_seed(8)
    seq_lens = [0, 5, 40, 300, 1000]
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, 16, torch.float32)
    q, _, _ = fused_qkv_views(len(seq_lens), num_heads, num_kv_heads, 16, torch.float32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * len(seq_lens)), lens, block_tables, 0.25)
    outs = {}
    for fused in (True, False):
        out = torch.full_like(q, float("nan"))
        paged_attention.paged_decode_attention(
            q, k_cache, v_cache, block_tables, lens, 0.25, out=out, num_splits=num_splits, fused_reduce=fused
        )
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=f"fused_reduce={fused}")
        outs[fused] = out
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=1e-6)
    assert _counters_are_zero("cpu")


def test_decode_fused_reduce_twice_in_a_row():
    """The merging program resets its counter, so the next launch (a CUDA-graph replay) merges again."""
    torch.manual_seed(9)
    seq_lens = [700, 3, 0, 129]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.empty(4, 4, 16)
    for step in range(3):
        q = torch.randn(4, 4, 16)
        paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25, out=out, num_splits=8)
        expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 4), lens, block_tables, 0.25)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=f"call {step}")
        assert _counters_are_zero("cpu")


def test_arrival_counters_allocated_once():
    """One zeroed buffer per device, reused by every call; a larger need adds one and keeps the old alive (graphs)."""
    cpu = torch.device("cpu")
    first = paged_attention._arrival_counters(cpu, 10)
    assert first.numel() >= 10 and first.dtype == torch.int32 and not first.any()
    assert paged_attention._arrival_counters(cpu, 10) is first
    bigger = paged_attention._arrival_counters(cpu, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert paged_attention._ARRIVALS[cpu][-2] is first and paged_attention._ARRIVALS[cpu][-1] is bigger


# ---------------------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize(
    "head_dim,block_size,q_lens,seq_lens",
    [
        (16, 16, [7, 130, 1], [7, 257, 1000]),  # plain prefill, cached prefix, decode-like
        (32, 32, [33, 1, 7], [33, 17, 255]),
        (32, 256, [130, 33], [130, 257]),
    ],
)
def test_prefill_matches_reference(num_heads, num_kv_heads, head_dim, block_size, q_lens, seq_lens):
    torch.manual_seed(3)
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, torch.float32)
    q, _, _ = fused_qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, torch.float32)
    qsl, lens = cumulative(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    out = paged_attention.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, max(q_lens), scale)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, scale)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("num_heads", [2, 8])
def test_prefill_diagonal_at_tile_edges(num_heads):
    """Prefixes around a multiple of the KV tile (64), where the unmasked/masked tile boundary moves."""
    torch.manual_seed(7)
    q_lens = [3] * 8 + [70]
    seq_lens = [prefix + 3 for prefix in range(60, 68)] + [134]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
    q = torch.randn(sum(q_lens), num_heads, 16)
    qsl, lens = cumulative(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 70, 0.25)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 0.25)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_prefill_non_power_of_two_group():
    """Qwen3-14B style group of 5 query heads per kv head."""
    torch.manual_seed(4)
    q_lens, seq_lens = [20, 3], [50, 3]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
    q = torch.randn(sum(q_lens), 10, 16)
    qsl, lens = cumulative(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 20, 0.25)
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 0.25)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    decode = paged_attention.paged_decode_attention(q[:2], k_cache, v_cache, block_tables, lens, 0.25, num_splits=2)
    expected = reference_attention(q[:2], k_cache, v_cache, cumulative([1, 1]), lens, block_tables, 0.25)
    torch.testing.assert_close(decode, expected, atol=ATOL, rtol=ATOL)


def test_store_then_chunked_prefill_then_decode():
    """The engine's order of calls: store a chunk's K/V, attend over prefix + chunk, then decode one token."""
    torch.manual_seed(5)
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 16, 16
    prefix, chunk = 21, 12
    k_cache = torch.zeros(8, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.tensor([[5, 2, 7, -1]], dtype=torch.int32)
    slots = lambda lo, hi: torch.tensor(  # noqa: E731
        [int(block_table[0, p // block_size]) * block_size + p % block_size for p in range(lo, hi)]
    )

    all_q, all_k, all_v = fused_qkv_views(prefix + chunk + 1, num_heads, num_kv_heads, head_dim, torch.float32)
    kv_store.store_kvcache(all_k[:prefix], all_v[:prefix], k_cache, v_cache, slots(0, prefix))
    kv_store.store_kvcache(all_k[prefix:-1], all_v[prefix:-1], k_cache, v_cache, slots(prefix, prefix + chunk))
    qsl, lens = cumulative([chunk]), torch.tensor([prefix + chunk], dtype=torch.int32)
    out = paged_attention.paged_prefill_attention(
        all_q[prefix:-1], k_cache, v_cache, qsl, lens, block_table, chunk, 0.3
    )

    # Dense causal attention over the whole sequence, last `chunk` rows.
    k = all_k.float().repeat_interleave(2, dim=1)
    v = all_v.float().repeat_interleave(2, dim=1)
    s = torch.einsum("qhd,khd->hqk", all_q.float(), k) * 0.3
    s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    torch.testing.assert_close(out, dense[prefix:-1], atol=ATOL, rtol=ATOL)

    kv_store.store_kvcache(all_k[-1:], all_v[-1:], k_cache, v_cache, slots(prefix + chunk, prefix + chunk + 1))
    lens = lens + 1
    out = paged_attention.paged_decode_attention(all_q[-1:], k_cache, v_cache, block_table, lens, 0.3, num_splits=2)
    torch.testing.assert_close(out, dense[-1:], atol=ATOL, rtol=ATOL)


def test_bf16_decode_and_prefill():
    torch.manual_seed(6)
    q_lens, seq_lens = [5, 1], [40, 70]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 32, torch.bfloat16)
    q, _, _ = fused_qkv_views(sum(q_lens), 8, 2, 32, torch.bfloat16)
    qsl, lens = cumulative(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention.paged_prefill_attention(q, k_cache, v_cache, qsl, lens, block_tables, 5, 32**-0.5)
    assert out.dtype == torch.bfloat16
    expected = reference_attention(q, k_cache, v_cache, qsl, lens, block_tables, 32**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    out = paged_attention.paged_decode_attention(q[:2], k_cache, v_cache, block_tables, lens, 32**-0.5, num_splits=2)
    expected = reference_attention(q[:2], k_cache, v_cache, cumulative([1, 1]), lens, block_tables, 32**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Skinny GEMM
# ---------------------------------------------------------------------------------------------------------------------

GEMM_CONFIGS = [
    None,  # gemm_config's choice
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, num_stages=2),  # several M, N and K tiles
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, SWAP_AB=True),  # split-K, masked K tail, partial N tile
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=4),  # more splits than some K have BLOCK_K steps for
]


@pytest.mark.parametrize("M", [1, 3, 16, 33])
@pytest.mark.parametrize("N", [16, 48, 64])
@pytest.mark.parametrize("K", [32, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skinny_linear_matches_reference(M, N, K, dtype):
    torch.manual_seed(10)
    x = torch.randn(M, K).to(dtype)
    weight = (torch.randn(N, K) / K**0.5).to(dtype)  # outputs ~N(0, 1)
    bias = torch.randn(N).to(dtype)
    product = x.float() @ weight.float().T
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: rounding of the output
    for config in GEMM_CONFIGS:
        for b in (None, bias):
            out = skinny_gemm.skinny_linear(x, weight, b, config=config)
            assert out.dtype == dtype and out.shape == (M, N)
            expected = product if b is None else product + b.float()
            msg = f"config={config} bias={b is not None}"
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol, msg=msg)


def test_skinny_linear_strided_rows():
    """x and W may be row slices of larger tensors (unit stride on K only), e.g. a view into a fused buffer."""
    torch.manual_seed(11)
    x = torch.randn(5, 80)[:, 8:72]
    weight = torch.randn(40, 100)[:, 20:84]
    config = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)
    out = skinny_gemm.skinny_linear(x, weight, config=config)
    torch.testing.assert_close(out, x @ weight.T, atol=1e-4, rtol=1e-4)
    assert skinny_gemm.skinny_linear(x[:0], weight).shape == (0, 40)


def test_gemm_config_and_use_skinny(monkeypatch):
    # Untuned shapes: the heuristic, and the kernel for bf16/fp16 up to DEFAULT_MAX_M rows (0 as shipped: cuBLAS).
    monkeypatch.setattr(skinny_gemm, "TUNED", {})
    assert not skinny_gemm.use_skinny(1, 4096, 1024, torch.bfloat16)
    monkeypatch.setattr(skinny_gemm, "DEFAULT_MAX_M", 64)
    assert skinny_gemm.gemm_config(1, 1024, 2048)["SPLIT_K"] > 1  # 1024 rows are too few slices for 132 SMs
    assert skinny_gemm.gemm_config(1, 151936, 1024)["SPLIT_K"] == 1
    assert skinny_gemm.gemm_config(256, 4096, 1024)["BLOCK_M"] == skinny_gemm.MAX_BLOCK_M
    assert skinny_gemm.use_skinny(64, 4096, 1024, torch.bfloat16)
    assert skinny_gemm.use_skinny(1, 4096, 1024, torch.float16)
    assert not skinny_gemm.use_skinny(65, 4096, 1024, torch.bfloat16)
    assert not skinny_gemm.use_skinny(1, 4096, 1024, torch.float32)

    # Tuned shapes: the smallest bucket >= M; cuBLAS where it measured faster or M is past the last bucket.
    fast = (16, 32, 256, 1, 4, 4, False, 2.0, 5.0)
    slow = (16, 64, 128, 2, 8, 3, True, 6.0, 5.0)
    monkeypatch.setitem(skinny_gemm.TUNED, (4096, 1024), {1: fast, 16: slow, 64: fast})
    assert skinny_gemm.gemm_config(1, 4096, 1024) == dict(zip(skinny_gemm.TUNED_FIELDS, fast[:7]))
    assert skinny_gemm.gemm_config(2, 4096, 1024) == dict(zip(skinny_gemm.TUNED_FIELDS, slow[:7]))
    fp32 = skinny_gemm.gemm_config(1, 4096, 1024, torch.float32)
    assert fp32 == skinny_gemm.heuristic_config(1, 4096, 1024, torch.float32)
    assert [skinny_gemm.use_skinny(m, 4096, 1024, torch.bfloat16) for m in (1, 2, 16, 17, 64, 65)] == [
        True, False, False, True, True, False,
    ]  # fmt: skip


def test_tuned_table_is_well_formed():
    """Entries pasted from benchmarks/kernel_bench.py --gemm: 7 config fields, then skinny and cuBLAS microseconds."""
    for (n, k), buckets in skinny_gemm.TUNED.items():
        assert n > 0 and k > 0
        for m, entry in buckets.items():
            assert m > 0 and len(entry) == len(skinny_gemm.TUNED_FIELDS) + 2, ((n, k), m, entry)
            cfg = dict(zip(skinny_gemm.TUNED_FIELDS, entry))
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, ((n, k), m, cfg)
            assert cfg["SPLIT_K"] >= 1 and isinstance(cfg["SWAP_AB"], bool), ((n, k), m, cfg)
