"""Named crash points, for the tests and ``bench/faults.py`` that kill the coordinator at an exact step.

With ``FEDLORA_CRASH_AT=NAME`` (or ``NAME:N``) in its environment, the process SIGKILLs itself the
first (or N-th) time it reaches ``crash_point(NAME)``: no clean-up runs, exactly as if the host
had pulled the plug there.  The points: ``plans-sent`` (every device of the round has its plan),
``ack`` (after an accepted update's ack went out), ``aggregate`` (after aggregation, before the
state is written), ``state-write`` (a snapshot half-written, its manifest not yet), ``outputs`` (the
run's final models written, its report and plots not yet); under secure aggregation
``secagg-keys`` (the rosters sent), ``secagg-shares`` (the shares relayed), ``secagg-masked`` (the
unmasking asked for).  Without the
variable a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("FEDLORA_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
