"""Whisper, everything after the model: log-mel features (features), the tokenizer with its
special tokens and timestamp decoding (tokenizer), the decoding loops, logit rules and word
timing (decoding), and the automatic-speech-recognition pipeline (asr). The nn.Modules are in
models/whisper.py, the CTranslate2 reader in checkpoints/ctranslate2.py. Part of pipelines.
"""
