"""The Triton sampling kernels (nanovllm_ray/kernels/sampling.py) through Triton's interpreter on the CPU.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_sampling_kernel_interpret.py -q

Importing test_kernels_interpret first sets TRITON_INTERPRET=1 (or skips this module where that cannot work).
"""

import pytest
import torch
from test_kernels_interpret import _patch_interpreter  # noqa: F401  (sets up or skips the interpreter)

from nanovllm_ray.kernels import sampling  # noqa: E402


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
