"""FedIT with a server step: the global factors move a share `server_lr` of the way to the clients' average.

A method from outside the package (docs/methods.md walks through it): load it with
`fedlora simulate --plugin examples/halfstep.py --method halfstep ...`.
"""

from dataclasses import dataclass

from fedlora_edge.coordinator.aggregate import average_components
from fedlora_edge.coordinator.errors import ConfigError
from fedlora_edge.coordinator.methods import register
from fedlora_edge.core.lora import uniform_plan


@dataclass(frozen=True)
class HalfStepSettings:
    server_lr: float = 0.5   # how far the server moves toward the clients' average

    def __post_init__(self):             # validated where it is defined; the error names the field
        if not 0.0 < self.server_lr <= 1.0:
            raise ConfigError("halfstep.server_lr: must be in (0, 1]")


@register                                # registered under its name
class HalfStep:
    """FedIT with a server step (`fedlora methods` shows the module's docstring, else this one)."""

    name = "halfstep"
    Settings = HalfStepSettings          # read from the `halfstep:` config section
    equal_in_same_out = False            # a server step: equal updates move the global only a share of the way

    def global_rank(self, ctx):
        return ctx.rank                  # lora.rank, as FedIT

    def plan(self, client, capacity, ctx, round_idx, state=None):
        # every device trains all lora.rank components; one that cannot hold them is skipped
        return uniform_plan(ctx.modules, ctx.rank, ctx.scale) if capacity >= ctx.rank else None

    def aggregate(self, global_factors, contributions, ctx, state):
        avg = average_components(global_factors, contributions, "trainers")
        lr = ctx.settings.server_lr      # its own settings, an instance of HalfStepSettings
        new = {m: (a + lr * (avg[m][0] - a), b + lr * (avg[m][1] - b)) for m, (a, b) in global_factors.items()}
        return new, {"server_lr": lr}    # the new factors, and what goes into this round's record
