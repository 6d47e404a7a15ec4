"""Third-party noise off unless asked for: torchao's "Failed to load ... .so" lines (CUDA kernels
on a CPU machine), torch's ``_pytree`` deprecation lines, transformers' and peft's FutureWarnings.
``--verbose`` (or ``FEDLORA_VERBOSE=1``, which the device processes of ``emulate`` inherit)
keeps them.  Called first thing by every command, before those libraries are imported."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._export", "torch.export",
                 "transformers", "datasets", "huggingface_hub", "onnxscript", "executorch")


def quiet_third_party(verbose: bool = False) -> None:
    if verbose:
        os.environ["FEDLORA_VERBOSE"] = "1"
    if os.environ.get("FEDLORA_VERBOSE") == "1":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(torch|transformers|peft|torchao|onnxscript|onnx|executorch|datasets)(\.|$)")
