import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Llama; shared, never trained in place by tests."""
    from fedlora_edge.core.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """What fedlora-edge builds once and reuses (training programs, ONNX bases, dequantised GGUF
    weights) goes to a folder of this test session's, not the user's cache: every session builds
    what it tests."""
    import os

    before = os.environ.get("FEDLORA_CACHE")
    os.environ["FEDLORA_CACHE"] = str(tmp_path_factory.getbasetemp() / "fedlora-cache")
    yield
    if before is None:
        os.environ.pop("FEDLORA_CACHE", None)
    else:
        os.environ["FEDLORA_CACHE"] = before
