"""The methods: the interface and registry (:mod:`.base`) and one module per method.

``get_method(name)`` fails with the list of valid names.  Importing this package registers the
built-in methods; a method defined elsewhere registers itself with ``@register`` when its module is
imported (``--plugin``, or an installed package's entry point: :mod:`fedlora_edge.coordinator.plugins`;
docs/methods.md).
"""

from . import (  # noqa: F401  (importing them registers them)
    centralized,
    clair,
    fed_plora,
    fedit,
    fedlease,
    flexlora,
    fslora,
    hafl,
    hetlora,
    local,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)
from .base import (  # noqa: F401  (the public names of the methods' layer)
    Accumulator,
    Averaging,
    Bound,
    Collected,
    Method,
    MethodContext,
    capacity_plan,
    get_method,
    global_copy,
    global_slice,
    is_registered,
    method_names,
    own_or_global,
    random_plan,
    register,
    settings_classes,
    trained_rank,
    unregister,
)
