"""Logits within fp32 tolerance of transformers over a prefill and several decode steps (teacher-forced)."""

import pytest
import torch

from nanovllm_ray import LLM
from nanovllm_ray.executor.step import StepInput


def _step(tokens, start, table, block_size) -> StepInput:
    return StepInput.forward_only([tokens], [start], [table], block_size)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_untied_model"])
def test_logits_match_transformers(request, fixture):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    seq = [(i * 7919) % 150000 for i in range(1, 90)]
    prefill, decodes = seq[:80], seq[80:]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([seq])).logits[0]
    llm = LLM(path, num_kvcache_blocks=32, max_model_len=512, block_size=16)
    runner = llm.engine.executor.runner
    table = [9, 3, 17, 0, 25, 30]  # scattered blocks, so the block table really is used
    got = [runner.forward_logits(_step(prefill, 0, table, 16))]
    for i, tok in enumerate(decodes):
        got.append(runner.forward_logits(_step([tok], len(prefill) + i, table, 16)))
    got = torch.cat(got)
    scale = ref.abs().max().item()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5 * scale, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
