import pytest


@pytest.fixture(scope="session")
def model_06b(tmp_path_factory):
    """The Qwen3-0.6B-shaped demo checkpoint (random weights, bf16), made once per session."""
    from nanovllm_ray.demo_model import make_demo_checkpoint

    return str(make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3-0.6b", "qwen3-0.6b"))
