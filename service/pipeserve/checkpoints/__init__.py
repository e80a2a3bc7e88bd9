"""Checkpoints: finding, naming and reading what a model is made of, before any code runs it.

Owns Hub and local-path resolution (hub: ModelFiles), model-name rules (model_names), the
embedded default checkpoints shipped as packages (embedded), safetensors / pickle reading and
strict state-dict assignment (weights), the CTranslate2 (faster-whisper) reader (ctranslate2),
and the registry that says which family module and which pipeline class serve a checkpoint
(registry: import paths as strings, so nothing heavy loads until a model of that kind does).

May import: core.
"""
