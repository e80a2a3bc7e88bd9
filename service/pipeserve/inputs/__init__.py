"""Inputs: untrusted request bytes -> validated tensors and text, with typed errors.

Owns audio (file and raw PCM decoding, resampling), images (decoding, pixel bounds) and
image processors, text tokenization (tokenizer.json), chat templates (role/content messages ->
prompt text in a jinja2 sandbox), OCR (Tesseract words and boxes) and
URI fetching under the server's allowlist. Every size-like value is bounded here before it
controls an allocation. Nothing here knows a model family or a task.

May import: core, checkpoints.
"""
