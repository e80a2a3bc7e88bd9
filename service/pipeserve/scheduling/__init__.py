"""Scheduling: who runs when, and on which thread.

Owns the compute lane (compute: model work on one thread that keeps torch's OpenMP pool warm),
admission (bounded per-model slots; QUEUE_FULL when full), and continuous batching for text
generation (generation_engine: admission, steps, token delivery; generation: sampling options,
token choice and incremental detokenization). The per-model dynamic batcher of one-shot calls
lives in runtime/batching.py, because it dispatches through the model manager.

May import: core, checkpoints, layers.
"""
