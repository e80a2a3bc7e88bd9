"""Whisper, everything after the model: log-mel features (features), the tokenizer with its
special tokens and timestamp decoding (tokenizer), the generation settings it reads
(generation_settings), decoding in openai-whisper's shape (decoding: the window loop, temperature
fallback and the long-form seek loop; token_decoders: greedy, sampling, beam search;
logit_filters: one rule each), segments and their times (segments), word-level times
(word_timing), and the automatic-speech-recognition pipeline (asr). The nn.Modules are in
models/whisper.py, the CTranslate2 reader in checkpoints/ctranslate2.py. Part of pipelines.
"""
