"""transformers' chunked Whisper output with one documented correction, as the oracle of our
chunked decoding.

A chunk can take several decoding passes (the model ends a pass with a timestamp pair before
the chunk's end and decoding resumes there), and each pass's timestamps restart at
<|0.00|>. transformers' _decode_asr finds the right stride from those raw timestamps, so a
restart makes it skip every later segment boundary (on 68 s of speech with tiny.en: one
segment 0-49.6 s, released at the end). pipeserve counts every pass's timestamps from the
chunk's start before merging; this oracle applies the same correction to transformers' chunk
tokens, written from the rule (a pass that ends in a timestamp pair <|p|><|q|> is followed by
one that starts p later: generate() resumes at the pair's first timestamp), not from our
code, and leaves everything else to transformers."""
from __future__ import annotations

import torch

LAST_TIMESTAMP = 1500  # <|30.00|>


def chunk_relative_tokens(tokens: list[int], tb: int) -> list[int]:
    out, offset, prev = [], 0, []
    for t in tokens:
        if t >= tb:
            if len(prev) >= 2 and prev[-1] >= tb and prev[-2] >= tb and t < prev[-1]:
                offset += prev[-2] - tb  # a new pass, from the first timestamp of the last pair
            prev.append(t)
            out.append(tb + min(LAST_TIMESTAMP, t - tb + offset))
        else:
            prev.append(t)
            out.append(t)
    return out


def corrected(hf):
    """The transformers pipeline `hf` with chunk tokens made chunk-relative before merging."""
    tb = hf.tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
    # Wrap transformers' own postprocess, once: the correction is not idempotent, and a module
    # fixture's pipeline passed here twice would otherwise shift its timestamps twice.
    original = hf.__dict__.setdefault("_uncorrected_postprocess", hf.postprocess)

    def postprocess(model_outputs, **kwargs):
        for output in model_outputs:
            if "stride" in output:
                rows = output["tokens"].tolist()
                output["tokens"] = torch.tensor([chunk_relative_tokens(row, tb) for row in rows])
        return original(model_outputs, **kwargs)

    hf.postprocess = postprocess
    return hf
