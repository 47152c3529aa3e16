"""The fused decode-path kernels on the GPU: the Triton sampler against torch, inside CUDA graphs and through the
engine's decode graphs (temperature-only requests sample in the graph; seeded / filtered / logprobs requests from the
graph's logits), the fused q/k norm + rotary + KV store against the unfused ops, the decode GEMV
(kernels/gemv.py) against the ops it folds in, in and out of CUDA graphs, and the element-wise kernels
(kernels/elementwise.py) against the plain ops, in and out of CUDA graphs, with an engine start that imports no
Dynamo."""

import os

import pytest
import torch

from nanovllm_ray import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sampling():
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import sampling

    return sampling


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_greedy_equals_torch_argmax(sampling, rows):
    torch.manual_seed(0)
    logits = torch.randn(rows, 151936, device="cuda").bfloat16()  # many exact ties in bf16
    got = sampling.sample_tokens(logits, torch.zeros(rows, device="cuda"))
    assert torch.equal(got, logits.float().argmax(-1))


def test_draws_follow_softmax(sampling):
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], device="cuda")
    t = 0.7
    logits = torch.full((20000, 151936), -1e4, device="cuda", dtype=torch.bfloat16)
    cols = torch.tensor([5, 70000, 100001, 151935], device="cuda")
    logits[:, cols] = (probs.log() * t).bfloat16()
    tokens = sampling.sample_tokens(logits, torch.full((20000,), t, device="cuda"))
    freq = torch.stack([(tokens == c).float().mean() for c in cols])
    assert torch.allclose(freq, probs, atol=0.015), freq.tolist()


def test_equal_logits_draw_every_token_alike(sampling):
    """With the whole vocabulary at one logit, the winner is the token of the largest noise draw of 151,936: the tail
    of _gumbel. Its id must be uniform over the vocabulary and over the four Philox lanes."""
    rows, vocab = 20000, 151936
    tokens = sampling.sample_tokens(torch.zeros(rows, vocab, device="cuda", dtype=torch.bfloat16),
                                    torch.full((rows,), 0.8, device="cuda"))
    quarters = torch.bincount(tokens * 4 // vocab, minlength=4).float() / rows
    lanes = torch.bincount(tokens % 4, minlength=4).float() / rows
    assert torch.allclose(quarters, torch.full((4,), 0.25, device="cuda"), atol=0.015), quarters
    assert torch.allclose(lanes, torch.full((4,), 0.25, device="cuda"), atol=0.015), lanes


def test_replays_in_a_cuda_graph_with_fresh_noise(sampling):
    logits = torch.zeros(64, 151936, device="cuda", dtype=torch.bfloat16)
    temps = torch.ones(64, device="cuda", dtype=torch.float64)
    out = torch.zeros(64, dtype=torch.int64, device="cuda")
    sampling.sample_tokens(logits, temps, out=out)  # warm-up (JIT, seed buffer)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampling.sample_tokens(logits, temps, out=out)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(out.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.parametrize("tp", [2, 4])
def test_vocabulary_slices_merge_to_the_whole_vocabulary_draw(sampling, tp):
    """Tensor-parallel sampling in the decode graphs: each rank samples its vocabulary slice (col_offset, the whole
    vocabulary's size) and the winners merge by score. A token's noise depends on its id and the seed, not on the
    split: with one seed the merged draw is the whole vocabulary's, bit for bit, greedy rows and ties included."""
    with torch.inference_mode():  # the seed tensor may have been made in inference mode (by an engine)
        _slices_merge_to_the_whole_draw(sampling, tp)


def _slices_merge_to_the_whole_draw(sampling, tp: int) -> None:
    from nanovllm_ray.layers.sampler import merge_shard_samples

    torch.manual_seed(0)
    n, vocab = 300, 151936
    logits = torch.randn(n, vocab, device="cuda").bfloat16()
    logits[:4] = 0.0  # every token ties: the greedy rows among these (0 and 3) take token 0
    temps = torch.full((n,), 0.8, device="cuda", dtype=torch.float64)
    temps[::3] = 0.0
    seed = sampling._seed(logits.device)
    start = seed.clone()
    whole = sampling.sample_tokens(logits, temps)
    shards = []
    for i, part in enumerate(logits.chunk(tp, -1)):
        seed.copy_(start)  # every rank draws with the same seed
        val = torch.empty(n, device="cuda")
        idx = sampling.sample_tokens(part, temps, col_offset=i * part.shape[1], out_val=val)
        shards.append(torch.stack([val.double(), idx.double()], -1))
    assert (idx >= (tp - 1) * vocab // tp).all()
    assert torch.equal(merge_shard_samples(torch.stack(shards)), whole)
    assert (whole[:4:3] == 0).all() and torch.equal(whole[::3], logits[::3].float().argmax(-1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny"))


def test_engine_sampling_through_decode_graphs(tiny):
    prompt = [[11, 22, 33, 44, 55]]
    results = {}
    for eager in (True, False):
        llm = LLM(tiny, dtype="float32", max_model_len=256, num_kvcache_blocks=256, enforce_eager=eager)
        seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=24, ignore_eos=True)
        logprobs = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
        results[eager] = llm.generate(prompt * 2, [seeded, logprobs], use_tqdm=False)
        if not eager:  # temperature-only: sampled inside the graph, different per request
            free = llm.generate(prompt * 16, SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
                                use_tqdm=False)
            assert len({tuple(o.token_ids) for o in free}) > 8
            bm = llm.engine.block_manager
            assert bm.num_free_blocks == bm.num_blocks
        del llm
        torch.cuda.empty_cache()
    eager, graphs = results[True], results[False]
    assert eager[0].token_ids == graphs[0].token_ids  # a seed fixes the draws on either path
    assert eager[1].token_ids == graphs[1].token_ids
    a = [chosen for chosen, _ in eager[1].logprobs]
    b = [chosen for chosen, _ in graphs[1].logprobs]
    assert a == pytest.approx(b, abs=0.05)


def test_fused_qk_norm_rope_store_on_model_shape():
    pytest.importorskip("triton")
    from nanovllm_ray.kernels.qk_norm_rope import qk_norm_rope_store
    from nanovllm_ray.layers import ops
    from nanovllm_ray.layers.attention.torch_ref import store_kvcache_ref
    from nanovllm_ray.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    n, heads, kv_heads, d = 300, 16, 8, 128
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16)
    q_w = (1 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    k_w = (1 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    cos_sin = RotaryEmbedding(d, 40960, 1_000_000.0).cos_sin_cache.cuda()
    positions = torch.randint(0, 40960, (n,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:n]
    slots[::7] = -1
    caches = [torch.zeros(64, 16, kv_heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q, k = qk_norm_rope_store(qkv, heads, kv_heads, q_w, k_w, 1e-6, cos_sin, positions, caches[0], caches[1], slots)
    f = qkv.float()
    q_ref, k_ref, v_ref = f.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q_ref, k_ref = ops.qk_norm_rope(q_ref.reshape(n, heads, d), k_ref.reshape(n, kv_heads, d), q_w.float(),
                                    k_w.float(), 1e-6, cos_sin, positions)
    store_kvcache_ref(k_ref.bfloat16(), v_ref.reshape(n, kv_heads, d).bfloat16(), caches[2], caches[3], slots)
    torch.testing.assert_close(q.float(), q_ref, atol=0.06, rtol=0.02)
    torch.testing.assert_close(k.float(), k_ref, atol=0.06, rtol=0.02)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), atol=0.06, rtol=0.02)
    assert torch.equal(caches[1], caches[3])


def _gemv_reference(x, weight, residual, norm_weight, silu_mul):
    from nanovllm_ray.layers import ops

    res_out = None
    if residual is not None:
        x, res_out = ops.add_rms_norm(x, residual, norm_weight, 1e-6)
    elif norm_weight is not None:
        x = ops.rms_norm(x, norm_weight, 1e-6)
    y = torch.nn.functional.linear(x, weight)
    return (ops.silu_and_mul(y) if silu_mul else y), res_out


@pytest.mark.parametrize("name,N,K,fusion", [("qkv_proj", 4096, 1024, "add_norm"), ("o_proj", 1024, 2048, "plain"),
                                             ("gate_up_proj", 3072, 1024, "add_norm_silu"),
                                             ("down_proj", 1024, 3072, "plain"), ("layer 0 qkv", 4096, 1024, "norm"),
                                             ("8b tp=2 qkv", 3072, 4096, "plain"),
                                             ("8b tp=2 o_proj", 4096, 2048, "plain")])
@pytest.mark.parametrize("M", [1, 2, 3, 4])  # one row, and the rows kernel
def test_gemv_on_model_shapes(name, N, K, fusion, M):
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import gemv

    if not gemv.supports(M, N * (2 if fusion.endswith("silu") else 1), K, torch.bfloat16):
        pytest.skip(f"{name} at {M} rows takes cuBLAS")
    torch.manual_seed(0)
    silu = fusion.endswith("silu")
    x = torch.randn(M, K, device="cuda").bfloat16()
    weight = (torch.randn(2 * N if silu else N, K, device="cuda") / K**0.5).bfloat16()
    residual = torch.randn(M, K, device="cuda").bfloat16() if "add" in fusion else None
    norm_weight = (1 + 0.1 * torch.randn(K, device="cuda")).bfloat16() if "norm" in fusion else None
    y, res_out = gemv.gemv(x, weight, residual=residual, norm_weight=norm_weight, silu_mul=silu)
    ref, ref_res = _gemv_reference(x, weight, residual, norm_weight, silu)
    torch.testing.assert_close(y.float(), ref.float(), atol=0.03, rtol=0.02)
    if residual is not None:
        assert torch.equal(res_out, ref_res)
    if M > 1:  # each row as the one-row kernel gives it alone (same slice, product and reduction)
        for m in range(M):
            alone, _ = gemv.gemv(x[m:m + 1], weight, residual=None if residual is None else residual[m:m + 1],
                                 norm_weight=norm_weight, silu_mul=silu)
            assert torch.equal(y[m:m + 1], alone), (m, (y[m] - alone[0]).abs().max())


@pytest.mark.parametrize("M", [1, 2, 4])
def test_gemv_chain_as_programmatic_dependents_in_a_cuda_graph(M):
    """Layers of fused GEMVs launched as programmatic dependents (each prefetches its weights before it waits for the
    kernel before it), captured and replayed: the same bits as plain launches, on fresh inputs at every replay."""
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import gemv, pdl

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm90+")
    torch.manual_seed(0)
    hidden, inter = 1024, 3072
    ws = [[(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for n, k in ((2048, hidden), (hidden, 2048),
                                                                             (2 * inter, hidden), (hidden, inter))]
          for _ in range(6)]
    nw = (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16()

    def chain(x, residual):
        for qkv, o, gate_up, down in ws:
            a, residual = gemv.gemv(x, qkv, residual=residual, norm_weight=nw)
            a, _ = gemv.gemv(a, o)
            a, residual = gemv.gemv(a, gate_up, residual=residual, norm_weight=nw, silu_mul=True)
            x, _ = gemv.gemv(a, down)
        return x, residual

    x_in = torch.randn(M, hidden, device="cuda").bfloat16()
    r_in = torch.randn(M, hidden, device="cuda").bfloat16()
    try:
        pdl.enable(True)
        chain(x_in, r_in)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x_in, r_in)
        for _ in range(3):
            x_in.normal_()
            r_in.normal_()
            graph.replay()
            pdl.enable(False)
            ref = chain(x_in, r_in)
            pdl.enable(True)
            torch.cuda.synchronize()
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    finally:
        pdl.enable(True)


SKINNY_GPU_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3, SWAP_AB=True),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=4, SWAP_AB=False),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=8, num_stages=3, SWAP_AB=False),
]


@pytest.mark.parametrize("M", [5, 64, 200])
@pytest.mark.parametrize("config", range(len(SKINNY_GPU_CONFIGS)))
def test_skinny_chain_as_programmatic_dependents(M, config):
    """qwen3-0.6b's projections through the skinny GEMM (split over K where the config says, then the combine
    kernel) against cuBLAS; then a chain of them captured as programmatic dependents (each bringing its W slice into
    L2 before it waits) and replayed: the same bits as plain launches, on fresh inputs at every replay."""
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import pdl, skinny_gemm

    torch.manual_seed(0)
    cfg = SKINNY_GPU_CONFIGS[config]
    ws = [[(torch.randn(n, k, device="cuda") / k**0.5).bfloat16() for n, k in ((4096, 1024), (1024, 2048),
                                                                             (6144, 1024), (1024, 3072))]
          for _ in range(4)]
    for w in ws[0]:
        a = torch.randn(M, w.shape[1], device="cuda").bfloat16()
        torch.testing.assert_close(skinny_gemm.skinny_linear(a, w, config=cfg).float(),
                                   torch.nn.functional.linear(a, w).float(), atol=0.03, rtol=0.02)

    def chain(x):
        for qkv, o, gate_up, down in ws:
            q = skinny_gemm.skinny_linear(x, qkv, config=cfg)
            a = skinny_gemm.skinny_linear(q[:, :2048].contiguous(), o, config=cfg)
            h = skinny_gemm.skinny_linear(a, gate_up, config=cfg)
            x = skinny_gemm.skinny_linear(h[:, :3072].contiguous(), down, config=cfg)
        return x

    x_in = torch.randn(M, 1024, device="cuda").bfloat16()
    try:
        pdl.enable(True)
        chain(x_in)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x_in)
        for _ in range(2):
            x_in.normal_()
            graph.replay()
            pdl.enable(False)
            ref = chain(x_in)
            pdl.enable(True)
            torch.cuda.synchronize()
            assert torch.equal(out, ref)
    finally:
        pdl.enable(True)


def _nearly_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """An RMSNorm's output against the plain op's: bit for bit but where the sum of squares, summed in another order
    than PyTorch's reduction, rounds the normalised value the other way (one bf16 ulp, then the weight's product)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = (got != want).sum().item()  # expected: ~3e-5 of the values at most
    assert differ <= max(2, got.numel() // 1000), f"{differ} of {got.numel()} values differ"
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-5)


@pytest.mark.parametrize("hidden", [1024, 4096])
@pytest.mark.parametrize("n", [1, 8, 256])
def test_elementwise_kernels_equal_plain_ops(hidden, n):
    """kernels/elementwise.py against ops.py's plain ops in bf16 on model shapes: the residual sum, SiLU-and-mul and
    the pending-token merge bit for bit, the norms nearly so (_nearly_bitwise)."""
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import elementwise
    from nanovllm_ray.layers.ops import _PLAIN as plain

    torch.manual_seed(0)
    x = torch.randn(n, hidden, device="cuda").bfloat16()
    residual = torch.randn(n, hidden, device="cuda").bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16()
    out, res_out = elementwise.add_rms_norm(x, residual, weight, 1e-6)
    ref, ref_res = plain["add_rms_norm"](x, residual, weight, 1e-6)
    assert torch.equal(res_out, ref_res)
    _nearly_bitwise(out, ref)
    _nearly_bitwise(elementwise.rms_norm(x, weight, 1e-6), plain["rms_norm"](x, weight, 1e-6))
    gate_up = 4 * torch.randn(n, 2 * 3072, device="cuda").bfloat16()
    assert torch.equal(elementwise.silu_and_mul(gate_up), plain["silu_and_mul"](gate_up))
    ids = torch.randint(0, 151936, (n,), device="cuda")
    tokens = torch.randint(0, 151936, (n + 3,), device="cuda")
    src = torch.randint(-1, n + 3, (n,), device="cuda")
    merged = elementwise.merge_pending(ids, src, tokens)
    want = plain["merge_pending"](ids, src, tokens)
    assert merged.dtype == want.dtype and torch.equal(merged, want)


def test_per_head_norm_through_ops_takes_the_kernel():
    """With the Triton ops on, ops.qk_norm_rope (the fallback attention path) norms q [n, heads, d], a strided view
    of the QKV rows, through the kernel (rows reshaped), nearly as the plain op does."""
    pytest.importorskip("triton")
    from nanovllm_ray.layers import ops
    from nanovllm_ray.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    n, heads, kv_heads, d = 40, 16, 8, 128
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, device="cuda").bfloat16()
    q, k = qkv[:, :heads * d].view(n, heads, d), qkv[:, heads * d:(heads + kv_heads) * d].view(n, kv_heads, d)
    q_w, k_w = (1 + 0.1 * torch.randn(2, d, device="cuda")).bfloat16()
    cos_sin = RotaryEmbedding(d, 4096, 1_000_000.0).cos_sin_cache.cuda()
    positions = torch.randint(0, 4096, (n,), device="cuda")
    saved = {name: getattr(ops, name) for name in (*ops._PLAIN, "qk_norm_rope_store", "skinny_gemm", "gemv")}
    try:
        ops.enable_triton_ops(False)
        ref = ops.qk_norm_rope(q, k, q_w, k_w, 1e-6, cos_sin, positions)
        ops.enable_triton_ops(True)
        assert ops.rms_norm is not ops._PLAIN["rms_norm"]
        got = ops.qk_norm_rope(q, k, q_w, k_w, 1e-6, cos_sin, positions)
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)
    for a, b in zip(got, ref):
        _nearly_bitwise(a, b)


def test_elementwise_chain_as_programmatic_dependents_in_a_cuda_graph():
    """merge_pending, add + RMSNorm, SiLU-and-mul and RMSNorm launched back to back as programmatic dependents (each
    waits for the kernel before it), captured and replayed on fresh inputs: the same bits as plain launches, and as
    the plain ops (the norms nearly)."""
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import elementwise, pdl
    from nanovllm_ray.layers.ops import _PLAIN as plain

    torch.manual_seed(0)
    n, hidden, inter = 8, 1024, 3072
    ids = torch.randint(0, 1000, (n,), device="cuda")
    src = torch.tensor([0, -1, 2, -1, 4, 5, -1, 7], device="cuda")
    tokens = torch.randint(1000, 2000, (n,), device="cuda")
    x = torch.randn(n, hidden, device="cuda").bfloat16()
    residual = torch.randn(n, hidden, device="cuda").bfloat16()
    gate_up = torch.randn(n, 2 * inter, device="cuda").bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16()

    def chain(ew):
        merged = ew["merge_pending"](ids, src, tokens)
        h, r = ew["add_rms_norm"](x, residual, weight, 1e-6)
        act = ew["silu_and_mul"](gate_up)
        return merged, h, r, act, ew["rms_norm"](r, weight, 1e-6)

    kernels = {name: getattr(elementwise, name) for name in plain}
    try:
        pdl.enable(True)
        chain(kernels)  # JIT compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(kernels)
        for _ in range(3):
            for t in (x, residual, gate_up):
                t.normal_()
            tokens.random_(1000, 2000)
            graph.replay()
            pdl.enable(False)
            eager = chain(kernels)
            pdl.enable(True)
            want = chain(plain)
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(out, eager))
            assert torch.equal(out[0], want[0]) and torch.equal(out[2], want[2]) and torch.equal(out[3], want[3])
            _nearly_bitwise(out[1], want[1])
            _nearly_bitwise(out[4], want[4])
    finally:
        pdl.enable(True)


def test_engine_compiles_nothing_with_torch_compile(tiny):
    """On CUDA with Triton the engine swaps in the Triton element-wise ops instead of torch.compile'd ones: a start
    and a generation (CUDA graphs) hand no frame to Dynamo. (Dynamo's modules may be imported all the same: torch's
    varlen attention imports them.) In a fresh process, where no other test compiled anything."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nanovllm_ray import LLM, SamplingParams\n"
        f"llm = LLM({tiny!r}, dtype='bfloat16', max_model_len=256, num_kvcache_blocks=64)\n"
        "llm.generate([[11, 22, 33]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)\n"
        "dynamo = sys.modules.get('torch._dynamo.utils')\n"
        "print(dynamo.counters['frames']['total'] if dynamo is not None else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0", proc.stdout[-2000:]


def test_start_up_compiles_its_kernels_in_the_compile_pass(tiny, monkeypatch):
    """The runner's compile pass (kernels/jit.py) compiles every Triton kernel the start-up's steps launch after it
    (the profile pass, the warm-up steps, the graphs' capture), launchers built and binaries loaded: none is compiled
    or loaded one at a time there. In a fresh process
    with an empty Triton cache, so that nothing was compiled before; its greedy tokens are those of an engine started
    without the pass (whose garbage outputs must leave no trace)."""
    import subprocess
    import sys
    import tempfile

    from nanovllm_ray.executor.model_runner import ModelRunner

    kwargs = dict(dtype="bfloat16", max_model_len=256, max_num_batched_tokens=512, max_num_seqs=16)
    prompts = [[11, 22, 33], [5] * 40]
    code = (
        "import triton\n"
        "from nanovllm_ray import LLM, SamplingParams\n"
        "from nanovllm_ray.executor.model_runner import ModelRunner\n"
        "passes, late = [], []\n"
        "compile_pass = ModelRunner._compile_kernels\n"
        "def wrapped(self):\n"
        "    compile_pass(self)\n"
        "    passes.append(1)\n"
        "ModelRunner._compile_kernels = wrapped\n"
        "def hook(*, repr, **kwargs):\n"  # before each compile of a kernel not in memory yet
        "    if passes:\n"
        "        late.append(repr)\n"
        "def load_hook(module, function, name, *args):\n"  # a kernel's first launch: its launcher built, loaded
        "    if passes:\n"
        "        late.append(name)\n"
        "triton.knobs.runtime.jit_cache_hook = hook\n"
        "triton.knobs.runtime.kernel_load_start_hook = load_hook\n"
        f"llm = LLM({tiny!r}, **{kwargs!r})\n"
        "assert passes == [1], passes\n"
        "assert not late, late\n"
        "params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)\n"
        f"print([r.token_ids for r in llm.generate({prompts!r}, params, use_tqdm=False)])\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NANOVLLM_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(ModelRunner, "_compile_kernels", lambda self: None)
    llm = LLM(tiny, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    assert proc.stdout.strip().splitlines()[-1] == str(expected), proc.stdout[-2000:]


def test_decode_graph_inputs_and_tokens_ring_in_a_cuda_graph():
    """A decode graph's first and last kernels, captured and replayed with new inputs copied in: decode_inputs
    unpacks each replay's block tables (its rows and width from the header) as the plain op does, and store_tokens
    writes the tokens into the pinned host ring's slot that the header names, readable once the replay is done."""
    pytest.importorskip("triton")
    from nanovllm_ray.kernels import elementwise
    from nanovllm_ray.layers.ops import _PLAIN as plain

    torch.manual_seed(0)
    bs, max_blocks = 16, 64
    ids = torch.zeros(bs, dtype=torch.int64, device="cuda")
    src = torch.full((bs,), -1, dtype=torch.int64, device="cuda")
    tokens = torch.zeros(bs, dtype=torch.int64, device="cuda")
    header = torch.zeros(4, dtype=torch.int64, device="cuda")
    compact = torch.zeros(bs * max_blocks, dtype=torch.int32, device="cuda")
    tables = torch.zeros(bs, max_blocks, dtype=torch.int32, device="cuda")
    ring = torch.full((4, 1 + bs), -1, dtype=torch.int64, pin_memory=True)

    def step():
        merged, _ = elementwise.decode_inputs(ids, src, tokens, header, compact, tables)
        tokens.copy_(merged * 2)  # stands in for the model and the sampler
        elementwise.store_tokens(tokens, header, ring)

    step()  # JIT compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for launch, (n, width) in enumerate([(3, 5), (16, 64), (1, 1), (9, 40)], start=1):
        new_ids = torch.randint(0, 1000, (bs,), device="cuda")
        new_src = torch.randint(-1, bs, (bs,), device="cuda")
        step_tables = torch.randint(0, 50_000, (n, width), dtype=torch.int32, device="cuda")
        want_tables = tables.clone()
        want_ids, _ = plain["decode_inputs"](new_ids, new_src, tokens, torch.tensor([n, width], device="cuda"),
                                             step_tables.flatten(), want_tables)
        ids.copy_(new_ids)
        src.copy_(new_src)
        header.copy_(torch.tensor([n, width, launch % 4, launch]))
        compact[:n * width] = step_tables.flatten()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tables, want_tables)
        assert ring[launch % 4, 0] == launch and ring[launch % 4, 1:].tolist() == (want_ids * 2).tolist()
