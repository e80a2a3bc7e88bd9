"""Task pipelines: preprocess -> forward -> postprocess, with transformers.pipeline semantics."""
