"""The device half of a method is declared in one typed place (core/lora.py's DeviceSteps), the
device reads it nowhere else, and what goes on the wire is the plan's JSON as before."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fedlora_edge.coordinator.methods import get_method, method_names
from fedlora_edge.coordinator.methods.base import MethodContext
from fedlora_edge.core.lora import ClientPlan, DeviceSteps, ModulePlan

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("steps, wire", [
    (DeviceSteps(), {}),
    (DeviceSteps(hold=8, frozen="fold"), {"hold": 8, "frozen": "fold"}),
    (DeviceSteps(hold=4, frozen="forward", importance=(0.85, 0.9)),
     {"hold": 4, "frozen": "forward", "importance": {"beta1": 0.85, "beta2": 0.9}}),
    (DeviceSteps(experts=(3, 1)), {"experts": {"count": 3, "own": 1}}),
])
def test_steps_travel_as_the_plans_json_and_come_back_the_same(steps, wire):
    assert steps.to_extra() == wire
    plan = ClientPlan({"m": ModulePlan((0, 1))}, 1.0, 2, {**wire, "variant": "method's own"})
    back = ClientPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.steps == steps and steps.plain == (wire == {})


@pytest.mark.parametrize("extra, needle", [
    ({"hold": 8}, "'hold' needs a 'frozen' mode"),
    ({"hold": 8, "frozen": "thaw"}, "'hold' needs a 'frozen' mode"),
    ({"frozen": "fold"}, "'hold' needs a 'frozen' mode"),
    ({"hold": 0, "frozen": "fold"}, "'hold' must be a positive rank"),
    ({"experts": {"count": 2, "own": 2}}, "experts count 2 and own expert 2 are inconsistent"),
    ({"experts": {"count": 2}}, "malformed device steps"),
    ({"importance": [0.85, 0.9]}, "malformed device steps"),
])
def test_a_malformed_step_is_refused_with_its_key(extra, needle):
    plan = ClientPlan({"m": ModulePlan((0,))}, 1.0, 1, extra)
    with pytest.raises(ValueError, match=needle):
        plan.steps  # noqa: B018 - reading it is the check


@pytest.mark.parametrize("name", method_names())
def test_every_methods_plans_are_readable_by_the_device_and_plain_when_it_says_so(name):
    m = get_method(name)
    ctx = MethodContext({"layer.q": (3, 2), "layer.v": (3, 4)}, 2.0, 2, 4)
    plan = m.plan("a", 3, ctx, 1)
    if plan is None:
        pytest.skip(f"{name} plans nothing for a device outside a run")
    steps = plan.steps  # the device's reading of the plan; raises on anything malformed
    if m.plain_plans:  # what an executorch device is sent: nothing beyond plain LoRA training
        assert steps.plain, f"{name} declares plain_plans but its plan asks for {steps}"


def test_the_device_reads_a_plans_steps_never_its_extra_keys():
    # the device half of every method goes through DeviceSteps: no device module indexes plan.extra
    for f in (ROOT / "edge_client").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "extra":
                raise AssertionError(f"{f.name}:{node.lineno} reads .extra; read plan.steps instead")
