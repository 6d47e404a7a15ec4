"""Model resolution: built-ins, local paths, and clear errors before anything loads."""

import pytest
import torch

from fedlora_edge.core.models import ModelNotFoundError, load_model, resolve_model


def test_tiny_model_is_deterministic_and_frozen():
    m1, tok = load_model("tiny-llama")
    m2, _ = load_model("tiny-llama")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not any(p.requires_grad for p in m1.parameters())
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("spec,needle", [
    ("no-such-model", "not a built-in"),
    ("/tmp/definitely/missing.gguf", "no such GGUF file"),
    ("./nope-dir/", "no such file or directory"),
])
def test_unknown_models_say_what_was_looked_for(spec, needle):
    with pytest.raises(ModelNotFoundError, match=needle):
        resolve_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_local_directory_model_loads(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m, t = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_the_first_load_of_a_gguf_model_is_a_plain_model_that_saves(tmp_path, monkeypatch):
    # the load that dequantises and fills the cache gives what every later load gives: a model
    # save_pretrained can write (it used to carry transformers' GGUF quantizer and refuse)
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    first, _ = load_model("smollm2-135m")
    first.save_pretrained(str(tmp_path / "saved"))
    again, _ = load_model("smollm2-135m")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
