"""What a method plans for each device of a fleet, from the devices' declared profiles and the
model's shape alone (no weights loaded): the engine's capacities and round plans, `fedlora plan`'s
table and `compare`'s same-devices check all start here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlora_edge.core.lora import ClientPlan

from .config import RunConfig
from .methods import MethodContext, get_method
from .planner import NO_FOOTPRINT, Capacity, Footprint, ModelShape, TrainForm, plan_capacity


def method_context(cfg: RunConfig, dims) -> MethodContext:
    method = get_method(cfg.method)
    return MethodContext(dims, cfg.lora.scale, cfg.lora.rank, cfg.lora.max_rank, cfg.seed,
                         cfg.method_settings.get(method.section))


def capacity_for(cfg: RunConfig, shape: ModelShape, profile, fp: Footprint = NO_FOOTPRINT,
                 takes_part: Callable[[Capacity], bool] | None = None) -> Capacity:
    """The planner's capacity for ``profile`` under this run's LoRA, training, planner and
    compression settings (the profile's own ``compression`` first), with what the method adds beyond
    the trained rank (``fp``).  Under compression ``auto`` the device gets the least lossy encoding at which it takes
    part (none, fp16, int8, int4 in turn): its capacity can train and ``takes_part`` says yes (the
    method plans it at that rank); int4's capacity when none does."""
    from fedlora_edge.core.compress import CODECS

    t, p = cfg.train, cfg.planner
    codec = profile.compression or cfg.transport.compression
    if cfg.privacy.dp.enabled or cfg.privacy.secure_aggregation.enabled:
        codec = "none"  # refused for the run (config.validate); a profile's own wish does not override that
    cap = None
    for c in (CODECS if codec == "auto" else (codec,)):
        cap = plan_capacity(profile, shape, max_rank=cfg.lora.max_rank, steps=t.steps, batch=t.batch_size,
                            seq=t.max_seq_len, deadline_s=p.round_deadline_s, overhead_gb=p.runtime_overhead_gb,
                            transfer_budget_s=p.transfer_budget_s, footprint=fp, form=TrainForm.of(t), compression=c,
                            block=cfg.transport.compression_block)
        if cap.can_train and (takes_part is None or takes_part(cap)):
            break
    assert cap is not None
    return cap


def planned_by(method, device: str, ctx: MethodContext) -> Callable[[Capacity], bool]:
    """Whether ``method`` gives ``device`` a round-1 plan at a capacity (``capacity_for``'s ``takes_part``)."""
    return lambda cap: method.plan(device, cap.rank, ctx, 1) is not None


@dataclass(frozen=True)
class FleetPlan:
    """What the method plans for one device of the fleet, from its declared profile (round 1)."""

    device: str
    profile: str
    capacity: Capacity
    plan: ClientPlan | None  # None: the device cannot take part in this method's run

    @property
    def reason(self) -> str:
        """Why it cannot take part ('' when it can)."""
        if self.plan is not None:
            return ""
        return self.capacity.reason or f"capacity {self.capacity.rank} is below what the method plans"


def fleet_plans(cfg: RunConfig) -> list[FleetPlan]:
    """Per device of ``cfg``'s fleet, its capacity under the method's footprint and the method's
    round-1 plan (None where it cannot take part): what ``fedlora plan`` shows and ``compare``
    checks, from the model's shape alone (no weights are loaded)."""
    from .fleet import load_fleet
    from .planner import meta_shape

    method = get_method(cfg.method)
    shape = meta_shape(cfg.model, list(cfg.lora.target_modules) or None)
    ctx = method_context(cfg, shape.adapted)
    fp = method.footprint(ctx)
    out = []
    for dev in load_fleet(cfg.fleet):
        cap = capacity_for(cfg, shape, dev.profile, fp, planned_by(method, dev.id, ctx))
        out.append(FleetPlan(dev.id, dev.profile.name, cap, method.plan(dev.id, cap.rank, ctx, 1)))
    return out
