"""The Triton sampler (kernels/sampling.py), the fused q/k norm + rotary + KV store (kernels/qk_norm_rope.py) and
the decode GEMV with its fused norm and SiLU-and-mul (kernels/gemv.py)
through Triton's interpreter on the CPU, against the PyTorch ops they replace.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_fused_kernels_interpret.py -q

Importing test_kernels_interpret first sets TRITON_INTERPRET=1 (or skips this module where that cannot work).
"""

import pytest
import torch
from test_kernels_interpret import _patch_interpreter  # noqa: F401  (sets up or skips the interpreter)

from nanovllm_ray.kernels import gemv, qk_norm_rope, sampling  # noqa: E402
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


@pytest.mark.parametrize("N,K", [(48, 64), (42, 1536)])  # a partial last W slice; K not a multiple of BLOCK_K
@pytest.mark.parametrize("fusion", ["plain", "norm", "add_norm", "add_norm_silu"])
def test_gemv_matches_unfused_ops(N, K, fusion):
    torch.manual_seed(0)
    M, dtype, eps = 1, torch.bfloat16, 1e-6
    silu = fusion.endswith("silu")
    x = torch.randn(M, K).to(dtype)
    weight = (torch.randn(2 * N if silu else N, K) / K**0.5).to(dtype)
    residual = torch.randn(M, K).to(dtype) if "add" in fusion else None
    norm_weight = (1 + 0.1 * torch.randn(K)).to(dtype) if "norm" in fusion else None
    y, res_out = gemv.gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=eps, silu_mul=silu)
    ref, ref_res = _gemv_reference(x, weight, residual, norm_weight, eps, silu)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = 6e-2 if silu else 2e-2  # the interpreter's roundings toward zero add up over silu's chain of them
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    if residual is None:
        assert res_out is None
    else:
        # the bf16 sum (the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: one ulp apart)
        torch.testing.assert_close(res_out.float(), ref_res.float(), atol=0, rtol=2 ** -7)


def test_gemv_takes_one_row_of_small_half_precision_weights():
    assert gemv.supports(1, 4096, 1024, torch.bfloat16) and gemv.supports(1, 6144, 1024, torch.float16)
    assert not gemv.supports(2, 4096, 1024, torch.bfloat16)  # batches of more rows stay on cuBLAS
    assert not gemv.supports(1, 4096, 1024, torch.float32)
    assert not gemv.supports(1, 4096, 1020, torch.bfloat16)  # rows not 16-byte aligned
    assert not gemv.supports(1, 6144, 4096, torch.bfloat16)  # qwen3-8b's QKV: 48 MiB, cuBLAS measured faster
    assert not gemv.supports(1, 4096, 2048, torch.bfloat16)  # its o_proj at tp=2: 16 MiB, not measured with it
