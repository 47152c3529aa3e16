import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def tiny_untied_model(tmp_path_factory) -> str:
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-untied", "tiny-untied"))


def assert_no_leak(engine) -> None:
    """Every KV block is free again once no request is left."""
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)


def decisive(truth: torch.Tensor, margin: float = 0.02) -> torch.Tensor:
    """Positions whose top-two logits are further apart than bf16 noise (margin x the largest |logit|). Random weights
    leave many near-ties elsewhere, where any two bf16 implementations may pick different tokens."""
    top2 = truth.float().topk(2, -1).values
    return (top2[:, 0] - top2[:, 1]) > margin * truth.float().abs().amax(-1)


@pytest.fixture(scope="session")
def model_06b(tmp_path_factory):
    """The Qwen3-0.6B-shaped demo checkpoint (random weights, bf16) for the GPU tests, made once per session."""
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3-0.6b", "qwen3-0.6b"))
