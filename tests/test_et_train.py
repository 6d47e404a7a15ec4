"""The executorch trainer backend: a training program gives the torch backend's SGD losses and update."""

import json

import pytest
import torch

from fedlora_edge.coordinator.et_compile import CompilingStore
from fedlora_edge.core.data import generate_task
from fedlora_edge.core.lora import (
    DeviceSteps,
    adapted_modules,
    from_state_dict,
    get_factors,
    install_adapter,
    lora_config,
    slice_factors,
    to_state_dict,
    uniform_plan,
)
from fedlora_edge.edge_client.et_train import (
    ProgramError,
    ProgramStore,
    ProgramTrainer,
    program_spec,
    train_program,
    unsupported,
)
from fedlora_edge.edge_client.trainer import TrainSettings, train_local

pytestmark = pytest.mark.integration
TARGETS = ["q_proj", "v_proj"]
BUILD_LOG: list[str] = []  # what the fixture's program build said


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A rank-4 plan on tiny-llama, non-zero start factors, and its program (built once)."""
    from fedlora_edge.core.models import load_model

    model, tok = load_model("tiny-llama")
    dims = adapted_modules(model, TARGETS)
    plan = uniform_plan(dims, 4, 2.0)
    gen = torch.Generator().manual_seed(3)
    start = {m: (torch.randn(4, i, generator=gen) * 0.1, torch.randn(o, 4, generator=gen) * 0.1)
             for m, (i, o) in dims.items()}
    settings = TrainSettings(steps=6, batch_size=4, lr=0.5, max_seq_len=48, grad_clip=1.0, optimizer="sgd")
    store = CompilingStore(tmp_path_factory.mktemp("programs"), log=BUILD_LOG.append)
    path, side = store.get(program_spec("tiny-llama", plan, TARGETS, settings.batch_size, settings.max_seq_len))
    examples = generate_task("add", 20, seed=1) + generate_task("upper", 20, seed=1)
    return tok, plan, start, settings, path, side, examples


def torch_sgd(tok, plan, start, settings, examples, seed):
    from peft import get_peft_model

    from fedlora_edge.core.models import load_model

    model, _ = load_model("tiny-llama")
    pm = get_peft_model(model, lora_config(plan, TARGETS), adapter_name="client")
    install_adapter(pm, "client", plan, slice_factors(start, plan), TARGETS)
    res = train_local(pm, tok, examples, settings, seed)
    return get_factors(pm, "client"), res


def test_program_trains_exactly_as_torch_sgd(setup):
    tok, plan, start, settings, path, side, examples = setup
    ref_factors, ref = torch_sgd(tok, plan, start, settings, examples, seed=11)
    factors, res = train_program(ProgramTrainer(path), tok, examples, plan, to_state_dict(start), settings, seed=11)
    assert res.steps == ref.steps == settings.steps
    assert abs(res.first_loss - ref.first_loss) < 1e-4
    assert abs(res.last_loss - ref.last_loss) < 1e-4
    assert abs(res.mean_loss - ref.mean_loss) < 1e-4
    assert res.last_loss < res.first_loss  # it learns
    got = from_state_dict(factors)
    moved = 0.0
    for module, (a, b) in ref_factors.items():
        assert torch.allclose(got[module][0], a, atol=1e-5) and torch.allclose(got[module][1], b, atol=1e-5)
        moved = max(moved, float((b - start[module][1]).abs().max()))
    assert moved > 1e-3  # the update is a real one, not the start sent back


def test_a_build_says_each_stage_as_it_goes(setup):
    """A build takes minutes on a real model (11-12 for SmolLM2): a line per stage, with the seconds."""
    stages = [line for line in BUILD_LOG if line.startswith("training program: ")]
    assert [s.split(": ")[1].split(" ")[0] for s in stages] == ["loading", "exporting", "to", "delegating", "to",
                                                                "wrote"]
    assert all(s.endswith(" s)") for s in stages)


def test_sidecar_maps_runtime_names_to_wire_keys(setup):
    *_, path, side, _ = setup
    keys = {v["key"] for v in side["parameters"].values()}
    assert keys == set(to_state_dict(setup[2]))
    assert all(n.startswith("m.base_model.model.") for n in side["parameters"])
    assert CompilingStore(path.parent).get(side["spec"])[1]["sha256"] == side["sha256"]  # cached, not rebuilt


def test_every_linear_and_mm_runs_in_xnnpack(setup):
    """Every ``linear`` and ``mm`` of the program (each Linear's forward, the LoRA factors', the
    backward's matmuls) is an XNNPACK delegate call, none left to the runtime's kernels; the
    exact-as-torch test above holds with them."""
    from fedlora_edge.core.models import load_model

    model, _ = load_model("tiny-llama")
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    lora = 2 * len(adapted_modules(model, TARGETS))
    assert setup[5]["matmuls_left"] == 0
    assert setup[5]["xnnpack_matmuls"] >= 2 * (linears + lora)  # forward, and the backward's as many again or more


def test_the_runtime_runs_the_threads_it_is_given(setup):
    """The runtime's pool (XNNPACK's matmuls run on it) starts with one thread per core; a
    device's trainer sets it."""
    from executorch.extension.pybindings import portable_lib

    ProgramTrainer(setup[4], threads=1)
    assert portable_lib._threadpool_get_thread_count() == 1


def test_mismatched_inputs_fail_clearly(setup, tmp_path):
    tok, plan, start, settings, path, side, examples = setup
    trainer = ProgramTrainer(path)
    with pytest.raises(ProgramError, match="do not fit"):
        trainer.set_factors({k: v for k, v in list(to_state_dict(start).items())[1:]})
    bigger = {m: (torch.zeros(5, a.shape[1]), torch.zeros(b.shape[0], 5)) for m, (a, b) in start.items()}
    with pytest.raises(ProgramError, match="trains"):
        trainer.set_factors(to_state_dict(bigger))
    with pytest.raises(ProgramError, match="batches of 4 sequences of up to 48"):
        train_program(trainer, tok, examples, plan, to_state_dict(start),
                      TrainSettings(steps=1, batch_size=2, max_seq_len=48, optimizer="sgd"), 0)
    with pytest.raises(ProgramError, match="SGD only"):
        train_program(trainer, tok, examples, plan, to_state_dict(start),
                      TrainSettings(steps=1, batch_size=4, max_seq_len=48), 0)
    with pytest.raises(ProgramError, match="routed experts"):
        train_program(trainer, tok, examples, uniform_plan(plan.modules, 4, 2.0, experts={"count": 2, "own": 0}),
                      to_state_dict(start), settings, 0)
    with pytest.raises(ProgramError, match="no training program"):
        ProgramTrainer(tmp_path / "missing.pte")
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(ProgramError, match="not a loadable"):
        ProgramTrainer(bad)
    with pytest.raises(ProgramError, match="checksum"):
        ProgramStore(tmp_path / "s").put(b"xx", side)
    with pytest.raises(ProgramError, match="names no key"):
        ProgramStore(tmp_path / "s").put(b"xx", {**side, "key": "../x"})


def test_unsupported_plans_are_named():
    plan = uniform_plan({"m": (4, 4)}, 2, 1.0)
    assert unsupported(plan) is None
    assert "frozen" in unsupported(uniform_plan({"m": (4, 4)}, 2, 1.0, hold=4, frozen="fold"))
    assert "importance" in unsupported(uniform_plan({"m": (4, 4)}, 2, 1.0, **DeviceSteps(importance=(0.85, 0.85)).to_extra()))
    assert "experts" in unsupported(uniform_plan({"m": (4, 4)}, 2, 1.0, **DeviceSteps(experts=(2, 0)).to_extra()))


def test_simulate_trains_executorch_devices_from_their_programs(tmp_path):
    """A fleet with two executorch devices (fp32 and int8 base): each trains in its program with
    SGD, its update is aggregated like any other, and the programs are built once per shape."""
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "fleet": "edge-runtimes", "method": "hetlora",
                                 "rounds": 2, "clients_per_round": 4, "train.steps": 3, "train.batch_size": 4,
                                 "train.max_seq_len": 48, "data.eval_per_domain": 2, "data.samples_per_client": 12,
                                 "data.tasks": ["add", "upper"], "max_new_tokens": 2, "lora.max_rank": 8})
    report = Simulation(cfg, tmp_path).run()
    for r in report["rounds"]:
        by = {row["client"]: row for row in r["clients"]}
        assert {c: by[c]["trainer"] for c in by} == {"agx-orin": "torch", "pi5": "torch",
                                                      "phone-et": "executorch", "pi5-et": "executorch"}
        assert not r["rejected"] and not r["failed"]
        assert all(row["steps"] == 3 and row["uplink_bytes"] == row["downlink_bytes"] > 0 for row in r["clients"])
    sides = [json.loads(p.read_text()) for p in (tmp_path / "programs").glob("*.json")]
    assert sorted(s["spec"]["base"] for s in sides) == ["fp32", "int8"]  # one per (shape, base), reused in round 2


def test_a_method_the_program_cannot_carry_fails_before_anything_starts(tmp_path):
    from fedlora_edge.coordinator.config import ConfigError, load_config
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "fleet": "edge-runtimes", "method": "hafl"})
    with pytest.raises(ConfigError, match="executorch trainer cannot carry.*phone-et"):
        Simulation(cfg, tmp_path)


def test_programs_are_reused_across_runs_from_the_cache(setup, tmp_path, monkeypatch):
    """A second run (another store, the same shared cache and base) copies the program built by
    the first instead of building it; another base, or a damaged cached copy, builds again."""
    import shutil

    from fedlora_edge.coordinator import et_compile

    *_, path, side, _ = setup
    built = []

    def fake_build(spec, dest, model=None, log=None):
        built.append(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        shutil.copyfile(path.with_suffix(".json"), dest.with_suffix(".json"))
        return json.loads(path.with_suffix(".json").read_text())

    monkeypatch.setattr(et_compile, "build_program", fake_build)
    spec, cache = side["spec"], tmp_path / "cache"
    logs = []
    first = CompilingStore(tmp_path / "run1", log=logs.append, cache=cache, identity=lambda: "base-a")
    first.get(spec)
    assert len(built) == 1 and len(list(cache.glob("*.pte"))) == 1
    p2, side2 = CompilingStore(tmp_path / "run2", log=logs.append, cache=cache, identity=lambda: "base-a").get(spec)
    assert len(built) == 1 and side2["sha256"] == side["sha256"] and p2.read_bytes() == path.read_bytes()
    assert any("reused from" in line for line in logs)
    CompilingStore(tmp_path / "run3", cache=cache, identity=lambda: "base-b").get(spec)
    assert len(built) == 2  # another base: another program
    for p in cache.glob("*.pte"):  # damage every cached copy (replaced, not written through a link)
        p.unlink()
        p.write_bytes(b"damaged")
    p4, side4 = CompilingStore(tmp_path / "run4", log=logs.append, cache=cache, identity=lambda: "base-a").get(spec)
    assert len(built) == 3 and p4.read_bytes() == path.read_bytes()
    assert any("does not check out" in line for line in logs)
    assert (tmp_path / "run2" / path.name).read_bytes() == path.read_bytes()  # earlier runs' copies untouched


def test_the_build_cache_key_hashes_the_compiler_alone(tmp_path, monkeypatch):
    """A built program is cached under a digest of the compiler (coordinator/et_compile.py), not
    of the device's runtime (edge_client/et_train.py): an edit to the runtime rebuilds nothing (a
    SmolLM2 program takes 11-12 minutes), an edit to the compiler rebuilds everything."""
    import hashlib
    from pathlib import Path

    from fedlora_edge.coordinator import et_compile
    from fedlora_edge.edge_client import et_train

    root = Path(__file__).resolve().parent.parent
    compiler, runtime = root / "coordinator" / "et_compile.py", root / "edge_client" / "et_train.py"
    assert et_compile.SOURCE.resolve() == compiler and Path(et_train.__file__).resolve() == runtime
    digest = et_compile._builder_digest()
    assert digest == hashlib.sha256(compiler.read_bytes()).hexdigest()[:16]
    spec = program_spec("tiny-llama", uniform_plan({"m": (4, 4)}, 2, 1.0), TARGETS, 4, 48)
    store = CompilingStore(tmp_path / "programs", cache=tmp_path / "cache", identity=lambda: "base-a")
    cached = store._cache_path(spec)

    edited = tmp_path / "et_train.py"  # the runtime's text changed: the same key
    edited.write_text(runtime.read_text() + "\n# an edit to the runtime\n")
    monkeypatch.setattr(et_train, "__file__", str(edited))
    assert et_compile._builder_digest() == digest and store._cache_path(spec) == cached

    edited = tmp_path / "et_compile.py"  # the compiler's text changed: another key
    edited.write_text(compiler.read_text() + "\n# an edit to the compiler\n")
    monkeypatch.setattr(et_compile, "SOURCE", edited)
    assert et_compile._builder_digest() != digest and store._cache_path(spec) != cached


def test_the_device_runtime_holds_no_compiler():
    """edge_client/et_train.py runs programs; building them (torch.export, to_edge, the XNNPACK
    lowering, the build cache) is coordinator/et_compile.py's, which the device never imports."""
    import ast
    from pathlib import Path

    from fedlora_edge.edge_client import et_train

    text = (Path(__file__).resolve().parent.parent / "edge_client" / "et_train.py").read_text()
    assert "torch.export" not in text and "to_edge" not in text and "exir" not in text
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {m for m in imported if m.startswith(("torch.export", "executorch.exir", "executorch.backends",
                                                     "peft", "torchao", "fedlora_edge.coordinator"))}
    for name in ("build_program", "_builder_digest", "_delegate_matmuls", "_fold_weight_transposes",
                 "_rewrite_empty_permuted", "_cache_path", "_to_cache", "_from_cache"):
        assert not hasattr(et_train, name) and not hasattr(et_train.ProgramStore, name), name
    assert not hasattr(et_train.ProgramStore, "get")  # a device keeps and runs programs; it builds none
