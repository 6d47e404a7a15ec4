"""fedlora-edge's shared core: what the coordinator and a device both speak.

The LoRA component vocabulary (:mod:`.lora`), the wire format and its signatures (:mod:`.wire`,
:mod:`.framing`, :mod:`.identity`, :mod:`.messages`, :mod:`.mqtt`), files written whole
(:mod:`.durable`), model loading and the base's precision (:mod:`.models`, :mod:`.precision`,
:mod:`.dtypes`), the built-in tasks (:mod:`.data`) and a machine's profile (:mod:`.profile`).
It imports neither the device (:mod:`fedlora_edge.edge_client`) nor the coordinator.
"""

from .quiet import quiet_third_party as _quiet

__version__ = "0.1.0"

_quiet(everywhere=False)  # the Python API as quiet as the commands (FEDLORA_VERBOSE=1 keeps the noise)
