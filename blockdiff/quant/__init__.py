"""Quantized DiffusionGemma checkpoints in the compressed-tensors layout.

`scheme` (schemes and integer formats), `ct_config` (the config.json `quantization_config`),
`convert` (the streaming `blockdiff quantize`), `kernels` and `modules` (low-bit matmuls and the
drop-in linears / experts that run them), `load` (what `checkpoint.load_model` uses for a quantized
directory). Loading needs nothing from here directly: `blockdiff.load_model` detects the config.
"""
