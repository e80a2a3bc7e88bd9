"""Model families: config dataclass + nn.Modules in transformers' names + the recipe that maps a
checkpoint's tensor names onto them, one module per family (causal_lm holds what the decoder-only
families share). A model module does no I/O (checkpoints/loader.py reads and assigns), no
tokenization, no decoding loop and no scheduling, and applies no speed pass (layers/passes.py
runs them from outside; a family only says which optional ones it takes, in `post_load`).

May import: core, checkpoints, layers.
"""
