"""Edge runtime exports: a base model and a run's adapter, for inference on a device.

- :mod:`fedlora_edge.export.build`: write an artifact with a KV cache: for ONNX Runtime, a base built by
  onnxruntime-genai's model builder (fp32, or weight-only int8/int4 ``MatMulNBits``) and the adapter
  as a separate file applied at run time (:mod:`fedlora_edge.export.onnx_genai`); for ExecuTorch, a ``.pte``
  lowered to XNNPACK holding the program and the adapter, with the base's weights (fp32, or 8da8w /
  8da4w through torchao) in a ``.ptd`` beside it.  Either way the base is the same bytes from run
  to run and a device downloads only the adapter part;
- :mod:`fedlora_edge.export.runners`: one ``logits(input_ids)`` interface over PyTorch, onnxruntime-genai and
  the ExecuTorch runtime, and greedy decoding with each runtime's KV cache (``fedlora generate``);
- :mod:`fedlora_edge.export.parity`: the report written beside every artifact (max |Δlogits| and top-1
  agreement against the merged PyTorch model on held-out prompts, exact-match accuracy on the
  built-in tasks for both, sizes, latency per token), and the check that fails an export whose
  parity is broken;
- :mod:`fedlora_edge.export.device_classes`: one export per device class of a fleet at the end of a run.

``fedlora export`` and ``fedlora generate`` are the command-line entry points.
"""
