"""fill-mask: a text with one or more mask tokens -> candidates for each mask, best first.

Ports transformers.pipelines.fill_mask.FillMaskPipeline (v5): softmax over the vocabulary at
each mask position (torch, float32), restricted to `targets` when given (a target not in the
vocabulary is replaced by the first token of its tokenization, as transformers does), top_k
capped by the number of targets, `sequence` decoded with padding removed and special tokens
skipped only when there is a single mask.
- No mask token in the text: INVALID_INPUT (reason MASK_MISSING), as transformers'
  PipelineException.
- A target that tokenizes to nothing, or no usable target: INVALID_PARAMETER.
- Over-long text: INPUT_TOO_LARGE (transformers does not truncate; truncating could cut the
  mask away).
- top_k <= 0: INVALID_PARAMETER. Empty text: INVALID_INPUT (EMPTY_INPUT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import InvalidInput, InvalidParameter, ModelLoadFailed
from ..tasks import Task
from .encoder_base import EncoderPipeline, check_positive, check_text
from .options import TaskOptions


@dataclass(frozen=True)
class Candidate:
    score: float
    token: int
    token_str: str
    sequence: str


@dataclass(frozen=True)
class FillMaskOptions(TaskOptions):
    top_k: int = 5
    targets: tuple[str, ...] | None = None  # None: the whole vocabulary


class FillMaskPipeline(EncoderPipeline):
    task: ClassVar[Task] = Task.FILL_MASK
    head: ClassVar[str] = "masked_lm"
    per_token_outputs: ClassVar[tuple[bool, ...]] = (True,)
    options_type: ClassVar[type[TaskOptions]] = FillMaskOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_token_id = self.tokenizer.token_id("mask_token")
        if self.mask_token_id is None:
            raise ModelLoadFailed(f"{self.files.name}'s tokenizer defines no mask_token", reason="TOKENIZER_INVALID")
        self.vocab = self.tokenizer.vocab()
        self.settle_defaults()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        check_positive(options, "top_k")
        targets = options.get("targets")
        options["targets"] = list(targets) if targets else None  # proto's empty repeated field = unset
        if options["targets"]:
            self.target_ids(options["targets"])  # bad targets fail before any compute
        return options

    def target_ids(self, targets: list[str]) -> torch.Tensor:
        """transformers' get_target_ids: vocabulary entry, else the first token of the target."""
        ids = []
        for target in targets:
            if not isinstance(target, str):
                raise InvalidParameter(f"targets must be strings, got {target!r}", metadata={"field": "targets"})
            token = self.vocab.get(target)
            if token is None:
                tokens = self.tokenizer.tokenize_ids(target)
                if not tokens:
                    raise InvalidParameter(f"target {target!r} is not in the vocabulary and tokenizes to nothing",
                                           metadata={"field": "targets"})
                token = tokens[0]
            ids.append(token)
        return torch.tensor(sorted(set(ids)), dtype=torch.long)

    def postprocess(self, ids: list[int], logits: torch.Tensor, options: FillMaskOptions) -> list[list[Candidate]]:
        input_ids = torch.tensor(ids)
        targets = self.target_ids(options.targets) if options.targets else None
        top_k = options.top_k
        if targets is not None:
            top_k = min(top_k, targets.shape[0])
        top_k = min(top_k, logits.shape[-1])
        masked = torch.nonzero(input_ids == self.mask_token_id, as_tuple=False).squeeze(-1)
        probs = logits[masked, :].softmax(dim=-1)
        if targets is not None:
            probs = probs[..., targets]
        values, predictions = probs.topk(top_k)
        single = values.shape[0] == 1
        result = []
        for i, (row_values, row_predictions) in enumerate(zip(values.tolist(), predictions.tolist())):
            row = []
            for value, p in zip(row_values, row_predictions):
                if targets is not None:
                    p = int(targets[p])
                tokens = input_ids.clone()
                tokens[masked[i]] = p
                tokens = tokens[tokens != self.tokenizer.pad_token_id]
                # Other masks stay visible in multi-mask sequences (transformers keeps specials then).
                sequence = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=single)
                row.append(Candidate(score=value, token=p, token_str=self.tokenizer.decode([p]), sequence=sequence))
            result.append(row)
        return result

    def fill(self, texts: list[str],
             options: FillMaskOptions | Mapping[str, Any] | None = None) -> list[list[list[Candidate]]]:
        """For each text, one list of candidates per mask token, in text order."""
        resolved = self.call_options(options)
        texts = [check_text(t) for t in texts]
        rows = self.tokenizer.encode(texts, truncation=None)
        for row in rows:
            if self.mask_token_id not in row.ids:
                raise InvalidInput(f"no mask token ({self.tokenizer.mask_token}) found in the text",
                                   reason="MASK_MISSING", metadata={"mask_token": self.tokenizer.mask_token})
        self.check_length(rows)
        return [self.postprocess(row.ids, logits, resolved) for row, (logits,) in zip(rows, self.run_rows(rows))]

    run_batch = fill  # what the dynamic batcher runs (contracts.BatchedPipeline)
