"""Task pipelines: preprocess -> forward -> postprocess, with transformers.pipeline semantics.

One module per task; a family that needs its own decoding keeps its pieces together in a
subpackage (whisper/: features, tokenizer, decoding, the ASR pipeline; ctc/: CTC decoding,
the ASR pipeline and its live stream). Pipelines turn inputs into model calls and results
into plain dataclasses; they know nothing of gRPC. contracts.py holds the Protocol of each
request shape (batched, speech recognition, generative) that callers use; options.py the base
of the one frozen options dataclass per task, built once per request by `pipeline.options`.
Every pipeline builds its model through base.load_family_model: the family's load sequence,
then the post-load passes.

May import: core, checkpoints, inputs, layers, scheduling, models.
"""
