"""Edge runtime exports: a base model with an adapter merged in, for inference on a device.

- :mod:`export.build`: merge the adapter into the base (``merged_model``) and write an ONNX model
  (torch's dynamo exporter, dynamic batch and sequence; weight-only int8 or int4 through
  onnxruntime's ``MatMulNBits`` as options) or an ExecuTorch ``.pte`` lowered to XNNPACK (fp32, 8da8w, 8da4w through torchao's
  ``quantize_``, skipping the layers a scheme cannot take and saying which);
- :mod:`export.runners`: one ``logits(input_ids)`` interface over PyTorch, onnxruntime and the
  ExecuTorch runtime, and greedy decoding on top of it (``fedlora generate``);
- :mod:`export.parity`: the report written beside every artifact (max |Δlogits| and top-1
  agreement against PyTorch on held-out prompts, exact-match accuracy on the built-in tasks for
  both, file size, latency per token), and the check that fails an export whose parity is broken.

``fedlora export`` and ``fedlora generate`` are the command-line entry points.
"""
