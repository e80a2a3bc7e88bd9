"""Checkpoints: finding, naming and reading what a model is made of, before any code runs it.

Owns Hub and local-path resolution (hub: ModelFiles), model-name rules (model_names), the
embedded default checkpoints shipped as packages (embedded), safetensors / pickle reading and
strict state-dict assignment (weights), the CTranslate2 (faster-whisper) reader (ctranslate2),
the one place that tells the formats apart (formats), config.json -> a family's config
dataclass (family_config), the one load sequence every family goes through (loader: read ->
build -> assign by the family's name table), and the registry that says which family module
and which pipeline class serve a checkpoint (registry: import paths as strings, so nothing
heavy loads until a model of that kind does).

May import: core.
"""
