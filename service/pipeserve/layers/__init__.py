"""Layers: building blocks and speed passes that act on models from outside.

Owns the one activation table (activations: config.json names -> functions and their fused
oneDNN post-ops), GPT-2's Conv1D (a transposed linear the passes must recognise), the KV cache
the causal families write into, and the post-load passes in their one ordered list (passes):
sibling projections fused into one linear (fused_linear), weight-only int8 (quantization), a
GGUF's own 4-8 bit grids (grid_detect) in pipeserve's native kernel (grid_native, over
kernels/) or torch's int4 kernel (grid_int4), device maps over several devices (device_map), oneDNN-prepacked
linears with their fused activations (packed_linear) or a column-major head (head_layout), and
the verified bfloat16 head for greedy steps (verified_head). A pass takes an nn.Module and
rewrites it; it never imports a model family, and a model file never imports a pass.

May import: core, checkpoints, kernels.
"""
