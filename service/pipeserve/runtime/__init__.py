"""Runtime: the models this server has loaded, and calls into them.

Owns loading a checkpoint into its task pipeline (loading; the pipeline builds its model through
the one load sequence and the post-load passes, pipelines/base.load_family_model),
the model manager (residency, on-demand loading rules, memory budget, eviction, in-flight
counts) and the dynamic batcher that groups concurrent one-shot calls per model (batching).

May import: core, checkpoints, layers, scheduling, pipelines.
"""
