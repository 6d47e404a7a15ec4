import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Llama; shared, never trained in place by tests."""
    from edge_client.models import load_model

    return load_model("tiny-llama")
