"""Exports for edge runtimes on the tiny model: ONNX (a KV-cached base from onnxruntime-genai's
builder, the adapter applied at run time, fp32/int8/int4) and ExecuTorch (fp32, 8da8w, a static
KV cache, the base's weights in a .ptd apart from the program and its adapter), the parity report and its failure, `fedlora generate`, adapters
that swap on one base, and clear errors."""

import json

import numpy as np
import pytest
import torch

from fedlora_edge.coordinator.cli import main
from fedlora_edge.coordinator.report import save_adapter
from fedlora_edge.core.lora import adapted_modules
from fedlora_edge.export.build import export, merged_model
from fedlora_edge.export.parity import ParityError, Tolerance, parity_report
from fedlora_edge.export.runners import ArtifactError, ExportError, load_runner, torch_runner

pytest.importorskip("onnxruntime")

IDS = np.array([[3, 8, 1, 22, 9, 14, 2, 5], [4, 4, 7, 30, 2, 1, 9, 11]], dtype=np.int64)
LOOSE = Tolerance(min_top1=0.0, max_accuracy_drop=1.0)  # random tiny weights: check the mechanism only


def _random_adapter(folder, rank: int, seed: int, targets=("q_proj", "v_proj"), ranks=None):
    """A peft adapter folder for tiny-llama with non-zero B, as `simulate` writes one; ``ranks``: a
    rank per target where they differ."""
    from fedlora_edge.core.models import load_model

    model, _ = load_model("tiny-llama")
    dims = adapted_modules(model, list(targets))
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for m, (n, o) in dims.items():
        r = (ranks or {}).get(m.rsplit(".", 1)[-1], rank)
        factors[m] = (torch.randn(r, n, generator=gen) * 0.3, torch.randn(o, r, generator=gen) * 0.3)
    save_adapter(folder, factors, 2.0, list(targets), "tiny-llama")
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return _random_adapter(tmp_path_factory.mktemp("run") / "adapter", 4, 0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Built ONNX bases go to a cache of this test module's own, not the user's."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path_factory.getbasetemp() / "fedlora-cache"))


@pytest.mark.integration
def test_onnx_fp32_base_plus_adapter_matches_the_merged_model_and_writes_its_parity_report(tmp_path, adapter):
    pytest.importorskip("onnxruntime_genai")
    artifact, meta, reference, tok = export("tiny-llama", adapter, "onnx", "fp32", tmp_path)
    base, _ = merged_model("tiny-llama")
    merged = torch_runner(reference).logits(IDS)
    assert np.abs(merged - torch_runner(base).logits(IDS)).max() > 1e-3  # the adapter is in
    run = load_runner(artifact)
    assert np.abs(run.logits(IDS) - merged).max() < 1e-4  # batch 2, any length: the adapter applied at run time
    assert meta["adapter_file"] == "adapter.onnx_adapter" and meta["adapter_bytes"] < meta["base_bytes"] / 10
    prompt = [3, 8, 1, 22, 9, 14, 2, 5]
    assert run.generate(prompt, 6, None)[0] == torch_runner(reference).generate(prompt, 6, None)[0]  # KV cache
    rep = parity_report(reference, tok, artifact, meta, per_task=1)
    assert rep["ok"] and rep["top1_agreement"] == 1.0 and rep["max_abs_logits_diff"] < 1e-3
    assert 0 <= rep["mean_kl_all"] < 1e-6  # fp32: the same distribution at every position
    assert rep["accuracy_artifact"] == rep["accuracy_torch"] and rep["positions"] < rep["positions_all"]
    assert rep["size_bytes"] == meta["base_bytes"] + meta["adapter_bytes"] and rep["ms_per_token_artifact"] > 0
    saved = json.loads((tmp_path / "parity.json").read_text())
    assert saved["top1_agreement"] == rep["top1_agreement"] and "Result: OK" in (tmp_path / "parity.md").read_text()


@pytest.mark.integration
def test_a_new_adapter_swaps_onto_the_same_base(tmp_path, adapter):
    """A second run's export reuses the built base bit for bit (same sha256); only the adapter
    differs, and a device applies it to the base it already has."""
    pytest.importorskip("onnxruntime_genai")
    from fedlora_edge.coordinator.report import save_adapter
    from fedlora_edge.core.models import load_model

    first, meta1, _, _ = export("tiny-llama", adapter, "onnx", "fp32", tmp_path / "one")
    model, _ = load_model("tiny-llama")
    dims = adapted_modules(model, ["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(1)
    other = {m: (torch.randn(2, n, generator=gen) * 0.3, torch.randn(o, 2, generator=gen) * 0.3)  # another rank
             for m, (n, o) in dims.items()}
    save_adapter(tmp_path / "second", other, 2.0, ["q_proj", "v_proj"], "tiny-llama")
    second, meta2, reference2, _ = export("tiny-llama", tmp_path / "second", "onnx", "fp32", tmp_path / "two")
    assert meta2["base_reused"] and meta2["base_sha256"] == meta1["base_sha256"]
    swapped = load_runner(first, adapter=second.parent / "adapter.onnx_adapter")  # the first folder's base
    assert np.abs(swapped.logits(IDS) - torch_runner(reference2).logits(IDS)).max() < 1e-4
    from fedlora_edge.export.onnx_genai import GenaiRunner

    bare = GenaiRunner(first.parent, None)  # no adapter: the LoRA inputs' rank-0 defaults, the base model itself
    assert np.abs(bare.logits(IDS) - torch_runner(merged_model("tiny-llama")[0]).logits(IDS)).max() < 1e-4
    with pytest.raises(ArtifactError, match="no such adapter file"):
        load_runner(first, adapter=tmp_path / "missing.onnx_adapter")
    from fedlora_edge.export.onnx_genai import write_adapter

    a, b = np.zeros((32, 2), np.float32), np.zeros((2, 32), np.float32)
    write_adapter({"model.layers.0.self_attn.o_proj": (a, b)}, tmp_path / "other.onnx_adapter")  # o_proj: not adapted
    with pytest.raises(ArtifactError, match="is not a LoRA input of the base"):
        load_runner(first, adapter=tmp_path / "other.onnx_adapter")


@pytest.mark.integration
def test_qkv_are_fused_with_one_lora_branch_per_layer_and_any_ranks_swap_on(tmp_path):
    """The base fuses q/k/v (one matmul per layer) and hangs ONE branch on it, A = [A_q | A_v] and B a
    block matrix: q and v of different ranks match the merged model; a q-only adapter, and one on k
    that the base was not built for, swap onto the same base; rank 0 is the base itself; an adapter
    of the layout before (its own q/v inputs) or with factors of two ranks is refused."""
    import onnx

    pytest.importorskip("onnxruntime_genai")
    from fedlora_edge.export.build import _with_adapter
    from fedlora_edge.export.onnx_genai import BASE_META, GenaiRunner, lora_factors, write_adapter

    qv = _random_adapter(tmp_path / "qv", 4, 3, ranks={"v_proj": 2})
    artifact, meta, reference, _ = export("tiny-llama", qv, "onnx", "fp32", tmp_path / "out")
    graph = onnx.load(str(artifact), load_external_data=False).graph
    layers = {int(n.name.split("layers.")[1].split("/")[0]) for n in graph.node if "/attn/qkv_proj/MatMul" in n.name}
    assert layers and not [n for n in graph.node if "/attn/q_proj/" in n.name or "/attn/v_proj/" in n.name]
    lora_in = sorted(i.name for i in graph.input if i.name.startswith("lora."))
    assert lora_in == sorted(f"lora.layers.{i}.attn.qkv.{f}" for i in layers for f in "AB")
    assert len([n for n in graph.node if "/lora/Add" in n.name]) == len(layers)  # one branch per layer
    run = load_runner(artifact)
    assert np.abs(run.logits(IDS) - torch_runner(reference).logits(IDS)).max() < 1e-4
    bare = GenaiRunner(artifact.parent, None)  # rank 0: the base
    assert np.abs(bare.logits(IDS) - torch_runner(merged_model("tiny-llama")[0]).logits(IDS)).max() < 1e-4
    assert meta["adapted_modules"] == 2 * len(layers)
    import os
    from pathlib import Path

    lora = None
    for p in (Path(os.environ["FEDLORA_CACHE"]) / "onnx-bases").glob("fp32-*/" + BASE_META):
        if json.loads(p.read_text())["sha256"] == meta["base_sha256"]:
            lora = json.loads(p.read_text())["lora"]
    assert lora is not None and set(lora) == {f"layers.{i}.attn.qkv" for i in layers}
    # other adapters onto this base, no rebuild: q only (rank 3), and k and v (k: not in the base's modules)
    for targets, ranks in ((("q_proj",), {"q_proj": 3}), (("k_proj", "v_proj"), {"k_proj": 1, "v_proj": 5})):
        folder = _random_adapter(tmp_path / "-".join(targets), 2, 5, targets, ranks)
        peft_model, _ = _with_adapter("tiny-llama", folder)
        file = write_adapter(lora_factors(peft_model), tmp_path / f"{'-'.join(targets)}.onnx_adapter", lora)
        want = torch_runner(merged_model("tiny-llama", folder)[0]).logits(IDS)
        assert np.abs(load_runner(artifact, adapter=file).logits(IDS) - want).max() < 1e-4
    # the adapter of a base with q/v apart, and factors of two ranks on one branch
    peft_model, _ = _with_adapter("tiny-llama", qv)
    write_adapter(lora_factors(peft_model), tmp_path / "apart.onnx_adapter")
    with pytest.raises(ArtifactError, match="fuses them"):
        load_runner(artifact, adapter=tmp_path / "apart.onnx_adapter")
    fused = lora["layers.0.attn.qkv"]
    write_adapter({"layers.0.attn.qkv": (np.zeros((fused["in"], 3), np.float32), np.zeros((2, fused["out"]), np.float32))},
                  tmp_path / "bad.onnx_adapter")
    with pytest.raises(ArtifactError, match="disagree on their rank"):
        load_runner(artifact, adapter=tmp_path / "bad.onnx_adapter")


@pytest.mark.integration
def test_a_damaged_cached_base_is_built_again(tmp_path, adapter):
    pytest.importorskip("onnxruntime_genai")
    from fedlora_edge.export.onnx_genai import BASE_META

    _, meta1, _, _ = export("tiny-llama", adapter, "onnx", "int8", tmp_path / "one")
    import json
    import os
    from pathlib import Path

    # this export's base: other tests of the session cache bases of their own beside it
    cached = next(p for p in (Path(os.environ["FEDLORA_CACHE"]) / "onnx-bases").glob("int8-*")
                  if (p / BASE_META).is_file() and json.loads((p / BASE_META).read_text())["sha256"] == meta1["base_sha256"])
    (cached / "model.onnx.data").unlink()  # a cleaner took a file away
    artifact, meta2, reference, _ = export("tiny-llama", adapter, "onnx", "int8", tmp_path / "two")
    assert not meta2["base_reused"] and meta2["base_sha256"] == meta1["base_sha256"]
    assert np.abs(load_runner(artifact).logits(IDS) - torch_runner(reference).logits(IDS)).max() < 0.5


@pytest.mark.integration
def test_broken_parity_fails_loudly_after_writing_the_report(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    artifact, meta, reference, tok = export("tiny-llama", None, "onnx", "fp32", tmp_path)
    with torch.no_grad():  # the reference drifts from what was exported
        next(p for n, p in reference.named_parameters() if n.endswith("q_proj.weight")).add_(0.5)
    with pytest.raises(ParityError, match="parity broken: max"):
        parity_report(reference, tok, artifact, meta, per_task=1)
    assert json.loads((tmp_path / "parity.json").read_text())["ok"] is False


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_onnx_quantized_bases_are_weight_only_and_keep_the_adapter_in_fp32(tmp_path, adapter, quant):
    import onnx

    pytest.importorskip("onnxruntime_genai")
    artifact, meta, reference, _ = export("tiny-llama", adapter, "onnx", quant, tmp_path)
    graph = onnx.load(str(artifact), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert nbits and all(a["block_size"] == 32 and a["accuracy_level"] == 4 for a in attrs)  # the CPU kernel's fast level
    assert {a["bits"] for a in attrs} == ({8} if quant == "int8" else {4, 8})  # int4: lm_head in int8
    # q/k/v fused (tiny-llama is no GGUF: int8 is the builder's int8), one branch on each layer's
    assert any("/attn/qkv_proj/" in n.name for n in nbits) and not any("/attn/q_proj/" in n.name for n in nbits)
    assert "weights_note" not in meta
    assert "MatMulInteger" not in {n.op_type for n in graph.node}
    lora = [n for n in graph.node if "/lora_" in n.name]
    assert lora and all(n.op_type == "MatMul" for n in lora)  # the adapter's branch stays fp32
    assert meta["skipped_layers"] == []
    run = load_runner(artifact)
    want = torch_runner(reference).logits(IDS)
    assert np.abs(run.logits(IDS) - want).max() < 0.5


@pytest.mark.integration
def test_cli_export_onnx_int8_then_generate(tmp_path, adapter, capsys):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "onnx"
    assert main(["export", "--model", "tiny-llama", "--adapter", str(adapter), "--format", "onnx", "--quant", "int8",
                 "--out", str(out), "--prompts-per-task", "1", "--min-top1", "0"]) == 0
    rep = json.loads((out / "parity.json").read_text())
    assert rep["quant"] == "int8" and rep["artifact"] == "model.onnx" and rep["adapter_bytes"] > 0
    said = capsys.readouterr().out  # a line per stage and every 5 prompts, not a spinner a log file never shows
    assert "export: loading tiny-llama" in said and "parity: 5/5 prompts" in said
    for artifact in (out, out / "model.onnx"):
        assert main(["generate", "--artifact", str(artifact), "--prompt", "add 1 and 2", "--max-new-tokens", "3"]) == 0
        assert "ms per token" in capsys.readouterr().err
    # a broken bar: exit 3, and the message says "parity broken" once
    assert main(["export", "--model", "tiny-llama", "--adapter", str(adapter), "--format", "onnx", "--quant", "int8",
                 "--out", str(out), "--prompts-per-task", "1", "--min-top1", "1.01"]) == 3
    err = capsys.readouterr().err
    assert err.count("parity broken") == 1 and err.startswith(f"fedlora: {out / 'model.onnx'}: parity broken: top-1")


@pytest.mark.integration
def test_a_merged_onnx_export_is_one_model_without_a_lora_branch_or_adapter_file(tmp_path, adapter):
    import onnx

    pytest.importorskip("onnxruntime_genai")
    separate, _, _, _ = export("tiny-llama", adapter, "onnx", "fp32", tmp_path / "apart")
    artifact, meta, reference, tok = export("tiny-llama", adapter, "onnx", "fp32", tmp_path / "merged", merged=True)
    graph = onnx.load(str(artifact), load_external_data=False).graph
    assert not any("/lora_" in n.name for n in graph.node) and not any(i.name.startswith("lora.") for i in graph.input)
    assert meta["merged"] and "adapter_file" not in meta and not (tmp_path / "merged" / "adapter.onnx_adapter").exists()
    want = torch_runner(reference).logits(IDS)
    assert np.abs(load_runner(artifact).logits(IDS) - want).max() < 1e-4  # the adapter is in the weights
    assert np.abs(load_runner(separate).logits(IDS) - want).max() < 1e-4  # as it is beside them
    rep = parity_report(reference, tok, artifact, meta, per_task=1)
    assert rep["ok"] and rep["top1_agreement"] == 1.0 and rep["size_bytes"] == meta["base_bytes"]
    # int8 merged: the merged weights quantized as one model, weight-only, no fp32 branch left
    q, _, _, _ = export("tiny-llama", adapter, "onnx", "int8", tmp_path / "merged8", merged=True)
    g8 = onnx.load(str(q), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in g8.node) and not any("/lora_" in n.name for n in g8.node)
    with pytest.raises(ExportError, match="--merged is for --format onnx"):
        export("tiny-llama", adapter, "executorch", "fp32", tmp_path / "et", merged=True)


def test_the_runs_system_prompt_is_what_fedlora_json_says_and_a_legacy_null_what_its_run_trained(tmp_path):
    """null means none for a run on the user's data; adapters written before the built-in tasks'
    prompt was recorded have null too, and their run's report.json says it was the built-in tasks."""
    from fedlora_edge.core.data import SYSTEM_PROMPT
    from fedlora_edge.export.build import system_prompt_of
    from fedlora_edge.export.parity import held_out, run_system_prompt

    def run(folder, sidecar, data=None):
        (folder / "adapter").mkdir(parents=True)
        if sidecar is not None:
            (folder / "adapter" / "fedlora.json").write_text(json.dumps(sidecar))
        if data is not None:
            (folder / "report.json").write_text(json.dumps({"config": {"data": data}}))
        return folder / "adapter"

    builtin = {"tasks": ["add"], "train_file": None, "train_dir": None, "dataset": None, "system_prompt": None}
    assert system_prompt_of(run(tmp_path / "a", {"model": "m", "system_prompt": None}, builtin)) == SYSTEM_PROMPT
    mine = {**builtin, "train_file": "my.jsonl"}
    assert system_prompt_of(run(tmp_path / "b", {"model": "m", "system_prompt": None}, mine)) is None
    assert system_prompt_of(run(tmp_path / "c", {"model": "m", "system_prompt": "Be brief."}, builtin)) == "Be brief."
    assert system_prompt_of(run(tmp_path / "d", {"model": "m", "system_prompt": None})) is None  # no report: none
    assert system_prompt_of(run(tmp_path / "e", None)) == SYSTEM_PROMPT  # a peft folder of another tool
    assert system_prompt_of(None) == SYSTEM_PROMPT  # the base alone
    # an export.json: its own value; a null from before is decided by the adapter it names
    assert run_system_prompt({"system_prompt": "Be brief."}) == "Be brief."
    assert run_system_prompt({"system_prompt": None, "adapter": str(tmp_path / "a" / "adapter")}) == SYSTEM_PROMPT
    assert run_system_prompt({"system_prompt": None, "adapter": str(tmp_path / "gone")}) is None
    assert run_system_prompt({}) == SYSTEM_PROMPT
    assert {ex.system for ex in held_out(1, system=None)} == {None}
    assert {ex.system for ex in held_out(1, system="Be brief.")} == {"Be brief."}


@pytest.mark.integration
def test_a_built_in_task_run_exports_and_generates_with_the_prompt_it_trained_with(tmp_path, monkeypatch, capsys):
    """A run on the built-in tasks trained with their system prompt: fedlora.json records it (it
    recorded null, and `generate` then gave the model no system prompt: "What is 12 + 30?" -> 62), the
    export and its parity report use it, and so does `generate`."""
    import fedlora_edge.core.data as data
    from fedlora_edge.core.data import SYSTEM_PROMPT

    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "run"
    assert main(["simulate", "--model", "tiny-llama", "--method", "fedit", "--rounds", "1", "--clients-per-round", "1",
                 "--local-steps", "1", "--set", "data.eval_per_domain=1", "--set", "data.tasks=[add]",
                 "--set", "data.samples_per_client=4", "--set", "max_new_tokens=2", "--out", str(out)]) == 0
    assert json.loads((out / "adapter" / "fedlora.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    onnx = tmp_path / "onnx"
    assert main(["export", "--adapter", str(out / "adapter"), "--format", "onnx", "--out", str(onnx),
                 "--prompts-per-task", "1"]) == 0
    assert json.loads((onnx / "export.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    assert json.loads((onnx / "parity.json").read_text())["system_prompt"] == SYSTEM_PROMPT
    seen = []
    real = data.prompt_ids
    monkeypatch.setattr(data, "prompt_ids", lambda tok, ex, *a, **k: seen.append(ex.system) or real(tok, ex, *a, **k))
    for extra, want in (([], SYSTEM_PROMPT), (["--system", ""], None), (["--system", "Be brief."], "Be brief.")):
        assert main(["generate", "--artifact", str(onnx), "--prompt", "What is 12 + 30?", "--max-new-tokens", "2",
                     *extra]) == 0
        assert seen[-1] == want


def test_bad_inputs_fail_with_a_clear_message(tmp_path, capsys):
    assert main(["export", "--model", "tiny-llama", "--format", "onnx", "--quant", "8da4w", "--out",
                 str(tmp_path)]) == 2
    assert "'8da4w' is not available for onnx; onnx takes fp32, int8, int4" in capsys.readouterr().err
    assert main(["generate", "--artifact", str(tmp_path / "nope.onnx"), "--prompt", "x"]) == 2
    assert "no export.json beside it" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="no such artifact file"):
        load_runner(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="no genai_config.json beside it"):
        load_runner(tmp_path / "junk.onnx")
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="cannot load it"):
        load_runner(tmp_path / "junk.onnx")
    with pytest.raises(ArtifactError, match="unknown artifact type '.bin'"):
        (tmp_path / "m.bin").write_bytes(b"")
        load_runner(tmp_path / "m.bin")
    with pytest.raises(ExportError, match="no adapter_config.json"):
        merged_model("tiny-llama", tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mixture.json").write_text("{}")
    with pytest.raises(ExportError, match="FedLEASE client model"):
        merged_model("tiny-llama", tmp_path / "model")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "8da8w"])
def test_executorch_export_runs_in_the_runtime_with_parity(tmp_path, adapter, quant):
    pytest.importorskip("executorch")
    artifact, meta, reference, tok = export("tiny-llama", adapter, "executorch", quant, tmp_path)
    assert artifact.name == f"model.{quant}.pte"
    from executorch.extension.pybindings import portable_lib

    run = load_runner(artifact, threads=1)
    assert portable_lib._threadpool_get_thread_count() == 1  # set, not whatever the pool started with
    want = torch_runner(reference)
    assert np.abs(run.logits(IDS[:1]) - want.logits(IDS[:1])).max() < (1e-4 if quant == "fp32" else 0.5)
    if quant == "fp32":  # decoding with the program's KV cache, twice: a second prompt is not misled by the first
        for prompt in ([3, 8, 1, 22, 9, 14, 2, 5], [7, 7, 2]):
            assert run.generate(prompt, 6, None)[0] == want.generate(prompt, 6, None)[0]
    rep = parity_report(reference, tok, artifact, meta, per_task=1, tolerance=None if quant == "fp32" else LOOSE)
    assert rep["ok"] and rep["prompts"] == 5
    # the base's weights are apart: the .pte is the program and the adapter, and an update is only that
    base = tmp_path / meta["base_file"]
    assert meta["base_file"] == f"base.{quant}.ptd" and meta["adapter_file"] == artifact.name
    assert meta["adapter_bytes"] == artifact.stat().st_size < base.stat().st_size == meta["base_bytes"]
    assert rep["size_bytes"] == meta["base_bytes"] + meta["adapter_bytes"]
    (tmp_path / "broken.pte").write_bytes(artifact.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="ExecuTorch runtime cannot load it"):
        load_runner(tmp_path / "broken.pte")


@pytest.mark.slow
def test_an_executorch_update_is_a_new_program_on_the_same_base_weights(tmp_path, adapter):
    """Two runs' adapters of different ranks: the same base.fp32.ptd bytes, and the second run's
    .pte runs on the first export's base as the second merged model does."""
    pytest.importorskip("executorch")
    second = _random_adapter(tmp_path / "second", 8, 1)
    _, first_meta, _, _ = export("tiny-llama", adapter, "executorch", "fp32", tmp_path / "first")
    artifact, meta, reference, _ = export("tiny-llama", second, "executorch", "fp32", tmp_path / "next")
    assert meta["base_sha256"] == first_meta["base_sha256"]
    assert meta["adapter_bytes"] > first_meta["adapter_bytes"]  # rank 8 against rank 4
    swapped = load_runner(tmp_path / "first" / "model.fp32.pte", threads=1, adapter=artifact)
    assert np.abs(swapped.logits(IDS[:1]) - torch_runner(reference).logits(IDS[:1])).max() < 1e-4
    with pytest.raises(ArtifactError, match="model.<quant>.pte"):
        load_runner(tmp_path / "first" / "model.fp32.pte", adapter=tmp_path / "first" / "export.json")
    (tmp_path / "first" / "base.fp32.ptd").unlink()
    with pytest.raises(ArtifactError, match="base weights .* are missing"):
        load_runner(tmp_path / "first" / "model.fp32.pte")


@pytest.mark.integration
def test_simulate_export_writes_one_artifact_per_device_class(tmp_path, monkeypatch, capsys):
    """Three devices, two classes (onnxruntime fp32 twice, onnxruntime int8): two artifacts, each
    listing its devices; a class whose parity breaks is reported, the other is still exported,
    and the command exits 3."""
    import yaml

    from fedlora_edge.core.profile import load_profile, save_profile
    from fedlora_edge.export import parity

    devices = []
    for did, quant in (("a", "fp32"), ("b", "int8"), ("c", "fp32")):
        prof = load_profile("profiles/jetson-agx-orin.yaml")
        path = tmp_path / f"{did}.yaml"
        save_profile(prof.__class__(**{**prof.to_dict(), "name": f"p-{did}", "quant": quant}), path)
        devices.append({"id": did, "profile": str(path)})
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"devices": devices}))
    monkeypatch.setitem(parity.TOLERANCE, ("onnx", "fp32"), Tolerance(min_top1=1.01))  # cannot be met
    monkeypatch.setitem(parity.TOLERANCE, ("onnx", "int8"), LOOSE)
    out = tmp_path / "run"
    code = main(["simulate", "--model", "tiny-llama", "--fleet", str(tmp_path / "fleet.yaml"), "--method", "fedit",
                 "--rounds", "1", "--clients-per-round", "3", "--local-steps", "2", "--set", "data.eval_per_domain=2",
                 "--set", "data.tasks=[add]", "--set", "data.samples_per_client=8", "--set", "max_new_tokens=2",
                 "--export", "--out", str(out)])
    assert code == 3
    index = json.loads((out / "export" / "index.json").read_text())
    rows = {(r["format"], r["quant"]): r for r in index["classes"]}
    assert set(rows) == {("onnx", "fp32"), ("onnx", "int8")}
    assert rows[("onnx", "fp32")]["devices"] == ["a", "c"] and rows[("onnx", "int8")]["devices"] == ["b"]
    assert rows[("onnx", "fp32")]["parity"].startswith("broken") and rows[("onnx", "int8")]["parity"] == "ok"
    assert (out / "export" / "onnx-int8" / "model.onnx").is_file()
    assert json.loads((out / "export" / "onnx-fp32" / "export.json").read_text())["adapter"] == str(out / "adapter")


def test_export_of_a_run_without_a_global_adapter_fails_before_training(tmp_path, capsys):
    assert main(["simulate", "--model", "tiny-llama", "--method", "local", "--export", "--out", str(tmp_path)]) == 2
    assert "no single global adapter" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_the_parity_kl_is_the_divergence_of_the_two_softmaxes():
    from fedlora_edge.export.parity import _kl

    a = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    assert np.allclose(_kl(a, a), 0.0) and np.allclose(_kl(a, a + 7.0), 0.0)  # shifts do not count
    b = np.array([[0.0, 2.0, -1.0], [0.5, 0.5, 0.5]])
    p, q = np.exp(a[0]) / np.exp(a[0]).sum(), np.exp(b[0]) / np.exp(b[0]).sum()
    assert _kl(a, b)[0] == pytest.approx(float((p * np.log(p / q)).sum())) and _kl(a, b)[1] == pytest.approx(0.0)
