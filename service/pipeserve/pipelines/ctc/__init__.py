"""CTC speech recognition (wav2vec2, HuBERT): the vocabulary and greedy CTC decoding with word
and character offsets (decoding), the automatic-speech-recognition pipeline (asr) and the
live-streaming session with incremental segments (stream). Part of pipelines.
"""
