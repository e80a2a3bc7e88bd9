"""Model families: config dataclass + nn.Modules in transformers' names + weight-name table,
one module per family (causal_lm holds what the decoder-only families share). A model module
does no I/O beyond reading its checkpoint, no tokenization, no decoding loop and no scheduling.

May import: core, checkpoints, layers.
"""
