"""Scheduling: who runs when, and on which thread.

Owns the compute lane (compute: model work on one thread that keeps torch's OpenMP pool warm),
admission (bounded per-model slots; QUEUE_FULL when full), and continuous batching for text
generation: generation_engine, the loop that wires generation_scheduler (queue, batch and token
bounds, cache slots), generation_steps (prompt chunks and decoding steps on the model, token
choice) and generation_output (tokens -> events, stop sequences, finish reasons) around the
requests they share (generation_requests); generation holds the sampling options, token choice
rules and incremental detokenization. The per-model dynamic batcher of one-shot calls
lives in runtime/batching.py, because it dispatches through the model manager.

May import: core, checkpoints, layers.
"""
