"""Third-party noise off unless asked for: torchao's "Failed to load ... .so" lines (CUDA kernels
on a CPU machine), torch's ``_pytree`` deprecation lines, transformers' and peft's FutureWarnings.
``--verbose`` (or ``FEDLORA_VERBOSE=1``, which the device processes of ``emulate`` inherit)
keeps them.  Called first thing by every command, before those libraries are imported, and by
``import fedlora_edge.core`` (which every module of the project imports first) for the Python API, in
its narrower form: only warnings raised in those libraries or where they point, in this project's
own modules, so that a notebook's own warnings still show."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._export", "torch.export",
                 "transformers", "datasets", "huggingface_hub", "onnxscript", "executorch")
NOISY_MODULES = r"(torch|transformers|peft|torchao|onnxscript|onnx|executorch|datasets)(\.|$)"
# where the Python API's filters apply: the libraries, and this project's modules, where a library's
# deprecation warning points when it is about how we call it
LIBRARY_MODULES = r"(torch|transformers|peft|torchao|onnxscript|onnx|executorch|datasets|huggingface_hub" \
                  r"|fedlora_edge)(\.|$)"

_added: dict = {"filters": [], "env": [], "levels": {}}  # what was changed, for --verbose to take back


def quiet_third_party(verbose: bool = False, everywhere: bool = True) -> None:
    """Silence the libraries' noise (module text).  ``everywhere`` (the commands): FutureWarning and
    DeprecationWarning from any module; else (the Python API) only those raised in
    :data:`LIBRARY_MODULES`.  ``verbose`` (or ``FEDLORA_VERBOSE=1``) takes back what an earlier call
    did and silences nothing."""
    if verbose:
        os.environ["FEDLORA_VERBOSE"] = "1"
    if os.environ.get("FEDLORA_VERBOSE") == "1":
        _take_back()
        return
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        if key not in os.environ:  # a user's own setting wins
            os.environ[key] = value
            _added["env"].append(key)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        _added["levels"].setdefault(name, logger.level)
        logger.setLevel(logging.ERROR)
    where = "" if everywhere else LIBRARY_MODULES
    _ignore(FutureWarning, where)
    _ignore(DeprecationWarning, where)
    _ignore(UserWarning, NOISY_MODULES)


def _ignore(category: type[Warning], module: str) -> None:
    warnings.filterwarnings("ignore", category=category, module=module)
    _added["filters"].append(warnings.filters[0])  # filterwarnings puts its filter first


def _take_back() -> None:
    filters = warnings.filters
    assert isinstance(filters, list), "warnings.filters is a list (typeshed types it a Sequence)"
    for entry in _added["filters"]:
        if entry in filters:
            filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # warnings' caches see the change
    if mutated is not None:
        mutated()
    for key in _added["env"]:
        os.environ.pop(key, None)
    for name, level in _added["levels"].items():
        logging.getLogger(name).setLevel(level)
    _added.update(filters=[], env=[], levels={})
