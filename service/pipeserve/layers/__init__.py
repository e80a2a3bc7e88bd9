"""Layers: building blocks and speed passes that act on models from outside.

Owns GPT-2's Conv1D (a transposed linear the passes must recognise), the KV cache the causal
families write into, oneDNN-prepacked linears (pack_linears, applied by runtime/loading.py)
with their fused activations, weight-only int8 (quantization), device maps over several devices
(device_map) and the verified bfloat16 head for greedy steps (verified_head). A pass takes an
nn.Module and rewrites it; it never imports a model family.

May import: core, checkpoints.
"""
