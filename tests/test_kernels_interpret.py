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
    for chunk in (10**6, 100, 64, None):  # unsplit, chunks not a multiple of the tile, one-tile chunks, the plan's
        out = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale, chunk=chunk)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=f"chunk={chunk}")


@pytest.mark.parametrize("chunk", [10**6, 64])
def test_decode_padding_rows_and_out_buffer(chunk):
    """seq_len 0 rows (block table all -1) give zeros, not NaN; `out` is written in place."""
    torch.manual_seed(2)
    seq_lens = [40, 0, 300, 0]
    k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
    q = torch.randn(4, 4, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    result = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25, out=out, chunk=chunk)
    assert result is out
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 4), lens, block_tables, 0.25)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def _plan_chunks(plan: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """(seq, index) of each chunk of a plan, in its order."""
    capacity = (len(plan) - paged_attention.PLAN_HEADER - rows - 1) // 3
    base = paged_attention.PLAN_HEADER + rows + 1
    items = int(plan[1])
    return list(zip(plan[base:base + items].tolist(), plan[base + capacity:base + capacity + items].tolist()))


def test_decode_plan():
    cpu = torch.device("cpu")  # counts as 132 SMs
    # Batch 1-8 (<= 64 pairs of 8 kv heads): up to MAX_SPLITS chunks a sequence, one 64-token tile at least.
    plan = paged_attention.decode_plan([640], 8, cpu)
    assert plan[0] == 64 and plan[1] == 10 and len(plan) == paged_attention.plan_size(1, 8, cpu)
    assert paged_attention.decode_plan([3500], 8, cpu)[0] == 256  # 14 chunks, not more than 16
    assert paged_attention.decode_plan([50], 8, cpu)[1] == 1
    # and no more than ~4 programs a SM (132 SMs on the CPU): batch 8 of 640 tokens, 66 chunks a kv head at most
    eight = paged_attention.decode_plan([640] * 8, 8, cpu)
    assert eight[0] == 128 and eight[1] == 40
    assert paged_attention.decode_plan([640] * 4, 8, cpu)[0] == 64  # batch 4 keeps one-tile chunks
    # Many sequences of even length run unsplit; a long one among them is cut into chunks of about the mean.
    even = paged_attention.decode_plan([640] * 128, 8, cpu)
    assert even[0] == 640 and even[1] == 128
    lens = [100] * 127 + [4000]
    plan = paged_attention.decode_plan(lens, 8, cpu)
    chunk = int(plan[0])
    assert chunk % 128 == 0 and chunk >= sum(lens) / 128  # 128-token tiles from more than 4 pairs a SM
    chunks = _plan_chunks(plan, 128)
    assert chunks[: -(-4000 // chunk) - 1] == [(127, i) for i in range(-(-4000 // chunk) - 1)]  # full chunks first
    assert sorted(chunks) == sorted([(s, 0) for s in range(127)] + [(127, i) for i in range(-(-4000 // chunk))])
    cu = plan[paged_attention.PLAN_HEADER:paged_attention.PLAN_HEADER + 129]
    assert cu[0] == 0 and cu[-1] == len(chunks) and (np.diff(cu) >= 1).all()
    base, capacity = paged_attention.PLAN_HEADER + 129, (len(plan) - paged_attention.PLAN_HEADER - 129) // 3
    assert plan[base + 2 * capacity:base + 2 * capacity + len(chunks)].tolist() == [lens[s] for s, _ in chunks]
    # A plan of any lengths fits the size a graph of that batch size holds.
    rng = np.random.default_rng(0)
    for rows in (1, 3, 8, 16, 24, 25, 64, 67, 256):
        for _ in range(20):
            lens = rng.integers(0, 8192, rows) * rng.integers(0, 2, rows)
            assert len(paged_attention.decode_plan(lens.tolist(), 8, cpu)) == paged_attention.plan_size(rows, 8, cpu)


def test_decode_plan_in_a_buffer():
    """A graph's plan buffer is reused step after step: a plan written into it reads as a fresh one."""
    torch.manual_seed(3)
    cpu = torch.device("cpu")
    buffer = np.full(paged_attention.plan_size(4, 2, cpu) + 5, -7, dtype=np.int32)
    for seq_lens in ([700, 3, 1, 129], [1, 1, 1, 1], [60, 2000, 64, 65]):
        k_cache, v_cache, block_tables = make_cache(seq_lens, 16, 2, 16, torch.float32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        plan = paged_attention.decode_plan(seq_lens, 2, cpu, out=buffer)
        q = torch.randn(4, 4, 16)
        out = paged_attention.paged_decode_attention(
            q, k_cache, v_cache, block_tables, lens, 0.25, plan=torch.from_numpy(plan)
        )
        expected = reference_attention(q, k_cache, v_cache, cumulative([1] * 4), lens, block_tables, 0.25)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL, msg=str(seq_lens))


def test_decode_config_regimes():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert paged_attention.decode_config(2, 128, bf16, 8, cpu)["num_stages"] == 1  # one-tile chunks
    assert paged_attention.decode_config(2, 128, bf16, 128, cpu)["BLOCK_N"] == 64
    assert paged_attention.decode_config(2, 128, bf16, 528, cpu)["BLOCK_N"] == 64  # unsplit, one wave
    assert paged_attention.decode_config(2, 128, bf16, 529, cpu)["BLOCK_N"] == 128
    assert paged_attention.decode_config(2, 128, torch.float32, 1024, cpu)["BLOCK_N"] == 32


@pytest.mark.parametrize("sms", [132, 1])  # 1 SM: merged 16 heads a program, as from 1.5 (sequence, kv head) pairs a SM
@pytest.mark.parametrize("chunk", [64, 96, 192])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(4, 2, 16), (10, 2, 32), (8, 1, 256)])  # groups 2, 5, 8
def test_decode_chunks_merged(chunk, num_heads, num_kv_heads, block_size, sms, monkeypatch):
    """Partials of up to 16 chunks (one merge loop) and more than 16 (two): a seq_len 0 row, a sequence shorter than one
    chunk (written directly), non-power-of-two groups."""
    monkeypatch.setattr(paged_attention, "_sm_count", lambda device: sms)
    torch.manual_seed(8)
    seq_lens = [0, 5, 40, 300, 2000]
    k_cache, v_cache, block_tables = make_cache(seq_lens, block_size, num_kv_heads, 16, torch.float32)
    q, _, _ = fused_qkv_views(len(seq_lens), num_heads, num_kv_heads, 16, torch.float32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected = reference_attention(q, k_cache, v_cache, cumulative([1] * len(seq_lens)), lens, block_tables, 0.25)
    out = torch.full_like(q, float("nan"))
    paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25, out=out, chunk=chunk)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


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
    decode = paged_attention.paged_decode_attention(q[:2], k_cache, v_cache, block_tables, lens, 0.25, chunk=64)
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
    out = paged_attention.paged_decode_attention(all_q[-1:], k_cache, v_cache, block_table, lens, 0.3, chunk=64)
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
    out = paged_attention.paged_decode_attention(q[:2], k_cache, v_cache, block_tables, lens, 32**-0.5, chunk=64)
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
    monkeypatch.setitem(skinny_gemm.TUNED, (4096, 1024), {4: None, 64: fast})  # None: cuBLAS
    assert [skinny_gemm.use_skinny(m, 4096, 1024, torch.bfloat16) for m in (1, 4, 5, 64, 65)] == [
        False, False, True, True, False,
    ]  # fmt: skip


def test_tuned_table_is_well_formed():
    """Entries pasted from benchmarks/gemv_bench.py --skinny or kernel_bench.py --gemm: 7 config fields, then skinny
    and cuBLAS microseconds; or None (cuBLAS)."""
    for (n, k), buckets in skinny_gemm.TUNED.items():
        assert n > 0 and k > 0
        for m, entry in buckets.items():
            if entry is None:
                continue
            assert m > 0 and len(entry) == len(skinny_gemm.TUNED_FIELDS) + 2, ((n, k), m, entry)
            cfg = dict(zip(skinny_gemm.TUNED_FIELDS, entry))
            for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, ((n, k), m, cfg)
            assert cfg["SPLIT_K"] >= 1 and isinstance(cfg["SWAP_AB"], bool), ((n, k), m, cfg)


def test_compile_only_launch_submits_each_specialisation_once(monkeypatch):
    """Inside a compile pass jit.launch compiles rather than launches: one warmup per distinct (tensor dtype and
    16-byte alignment, other values), so that repeats skip Triton's slow lookup; outside it is kernel[grid]."""
    from nanovllm_ray.kernels import jit

    class Kernel:
        def __init__(self):
            self.warmups, self.launched = [], []

        def warmup(self, *args, grid, **kwargs):
            self.warmups.append((args, kwargs))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launched.append(grid)

    kernel = Kernel()
    x = torch.zeros(64, dtype=torch.bfloat16)
    monkeypatch.setattr(jit, "_compiling", True)
    for t, n, block in ((x, 128, 128), (x[8:], 128, 128), (x, 128, 128), (x[1:], 128, 128), (x, 256, 128),
                        (x, 128, 256), (x.float(), 128, 128), (x, 128, True), (x, 128, 1)):
        jit.launch(kernel, (4,))(t, n, BLOCK=block)
    # x[8:] is 16 bytes in: aligned like x; x[1:] is not; constexpr 128 and 256 differ, as do True and 1
    assert [(a[0].data_ptr() % 16, a[0].dtype, a[1], k["BLOCK"]) for a, k in kernel.warmups] == [
        (0, torch.bfloat16, 128, 128), (2, torch.bfloat16, 128, 128), (0, torch.bfloat16, 256, 128),
        (0, torch.bfloat16, 128, 256), (0, torch.float32, 128, 128), (0, torch.bfloat16, 128, True),
        (0, torch.bfloat16, 128, 1),
    ]  # fmt: skip
    assert kernel.launched == []
    monkeypatch.setattr(jit, "_compiling", False)
    jit.launch(kernel, (4,))(x, 128, BLOCK=128)
    assert kernel.launched == [(4,)] and len(kernel.warmups) == 7


def test_a_compile_that_fails_in_the_pass_raises_and_leaves_no_pass_behind():
    """Triton's async compile mode stays active when a compile raises on leaving it; compile_only resets it, so the
    error is the compile's and later compiles in the process do not go to the pass's pool, shut down."""
    from triton.runtime import _async_compile

    from nanovllm_ray.kernels import jit

    class Failing:
        def warmup(self, *args, grid, **kwargs):
            def compile_fn():
                raise ValueError("this kernel does not compile")

            _async_compile.active_mode.get().submit("key", compile_fn, lambda kernel: kernel)

    with pytest.raises(ValueError, match="does not compile"):
        with jit.compile_only(workers=1):
            jit.launch(Failing(), (1,))(torch.zeros(4))
    assert _async_compile.active_mode.get() is None and not jit.compiling()
    with jit.compile_only(workers=1) as mode:  # a pass after it starts clean
        pass
    assert mode.future_kernels == {}
