"""zero-shot-classification: a text and labels chosen by the caller -> the labels with scores,
best first, from a natural-language-inference classifier.

Ports transformers.pipelines.zero_shot_classification.ZeroShotClassificationPipeline:
- one (premise, hypothesis) pair per candidate label, the hypothesis being
  `hypothesis_template.format(label)`; the premise alone is truncated (only_first) to the
  tokenizer's model_max_length, so the label is never cut;
- the entailment id is the first label2id name starting with "entail" (-1 when none, as
  transformers does after its warning), contradiction is id 0 (or -1 when entailment is 0);
- multi_label (or a single label): softmax of [contradiction, entailment] per label;
  otherwise softmax of the entailment logits across labels; ranking by argsort as transformers.

Works with every NLI head our families offer through `load_model(..., "sequence_classification")`:
BART (bart-large-mnli), BERT, RoBERTa, XLM-RoBERTa, DistilBERT. All pairs of all requests in a
call run in padded batches; padding does not change a pair's logits, so batched = unbatched.

Limits beyond transformers (it accepts them and returns confusing or no results): at most
`max_candidate_labels` labels (128), no empty or duplicate labels, no empty text.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InputTooLarge, InvalidInput, InvalidParameter, PipeserveError
from ..inputs.text import Row, TextTokenizer, model_max_tokens
from ..tasks import Task
from .base import LoadOptions
from .encoder_base import TextModelPipeline
from .options import TaskOptions

# Each label costs one forward pass of the whole text: 128 labels of a 1,000-token text on
# bart-large-mnli is already ~0.1 TFLOP. More is refused rather than queued for minutes.
MAX_CANDIDATE_LABELS = 128
# Raw text bound before tokenizing (tokenizers' cost is linear in it; truncation happens after).
MAX_SEQUENCE_CHARS = 1_000_000
# A sequence longer than this many characters per model token is tokenized once on its own
# and cut after the words the model can see, before it is paired with every label: otherwise
# each label re-tokenizes the whole text (1 MB x 32 labels took 81 s on a 2-core machine).
_CUT_BEYOND_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class ZeroShotRequest:
    sequence: str
    candidate_labels: tuple[str, ...]


@dataclass(frozen=True)
class ZeroShotResult:
    sequence: str
    labels: list[tuple[str, float]]  # best first


@dataclass(frozen=True)
class ZeroShotClassificationOptions(TaskOptions):
    # transformers' defaults; truncation is ours (transformers always truncates the premise).
    hypothesis_template: str = "This example is {}."
    multi_label: bool = False
    truncation: bool = True


class ZeroShotClassificationPipeline(TextModelPipeline):
    task: ClassVar[Task] = Task.ZERO_SHOT_CLASSIFICATION
    head: ClassVar[str] = "sequence_classification"  # the NLI classifier
    # transformers' defaults; truncation is ours (transformers always truncates the premise).
    options_type: ClassVar[type[TaskOptions]] = ZeroShotClassificationOptions
    max_candidate_labels: int = MAX_CANDIDATE_LABELS
    # Pairs per forward pass (bounds activation memory of a call with many labels).
    max_batch_size: int = 32

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module, tokenizer: TextTokenizer):
        super().__init__(files, options, model, tokenizer)
        config = files.config
        self.max_tokens = tokenizer.limit(model_max_tokens(config))
        self.entailment_id = entailment_id(config.get("label2id") or {})
        self.contradiction_id = -1 if self.entailment_id == 0 else 0
        # Only the inputs the model's forward takes (BART has no token types).
        self._takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.settle_defaults()

    # -- options ---------------------------------------------------------------------------

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        template = options.get("hypothesis_template")
        if not isinstance(template, str):
            raise InvalidParameter(f"hypothesis_template must be a string, got {template!r}",
                                   metadata={"field": "hypothesis_template"})
        try:
            formatted = template.format("label")
        except (IndexError, KeyError, ValueError) as exc:
            raise InvalidParameter(f'hypothesis_template {template!r} is not a valid format string with one "{{}}" '
                                   f"where the label goes: {type(exc).__name__}: {exc}",
                                   metadata={"field": "hypothesis_template"}) from None
        if formatted == template:
            raise InvalidParameter(f'hypothesis_template {template!r} has no "{{}}" where the label goes, '
                                   'such as "This example is {}."', metadata={"field": "hypothesis_template"})
        for name in ("multi_label", "truncation"):
            options[name] = bool(options.get(name))
        return options

    def check_request(self, request: ZeroShotRequest) -> None:
        if not isinstance(request.sequence, str) or not request.sequence.strip():
            raise InvalidInput("the sequence to classify is empty", reason="EMPTY_INPUT",
                               metadata={"field": "sequence"})
        if len(request.sequence) > MAX_SEQUENCE_CHARS:
            raise InputTooLarge(f"the sequence has {len(request.sequence)} characters; at most "
                                f"{MAX_SEQUENCE_CHARS} are accepted",
                                metadata={"field": "sequence", "limit": str(MAX_SEQUENCE_CHARS)})
        labels = request.candidate_labels
        if not labels:
            raise InvalidInput("candidate_labels is empty: give at least one label to score the text against",
                               reason="NO_CANDIDATE_LABELS", metadata={"field": "candidate_labels"})
        if len(labels) > self.max_candidate_labels:
            raise InputTooLarge(f"{len(labels)} candidate labels; at most {self.max_candidate_labels} are "
                                "accepted per request (each label is one forward pass)",
                                metadata={"field": "candidate_labels", "limit": str(self.max_candidate_labels)})
        seen: set[str] = set()
        for i, label in enumerate(labels):
            if not label.strip():
                raise InvalidInput(f"candidate_labels[{i}] is empty", metadata={"field": "candidate_labels"})
            if label in seen:
                raise InvalidInput(f"candidate label {label!r} appears more than once; labels must be distinct",
                                   reason="DUPLICATE_LABELS", metadata={"field": "candidate_labels"})
            seen.add(label)

    # -- steps -----------------------------------------------------------------------------

    def preprocess(self, request: ZeroShotRequest, options: ZeroShotClassificationOptions) -> list[Row]:
        """One encoded (premise, hypothesis) pair per label, the premise truncated to fit."""
        self.check_request(request)
        hypotheses = [options.hypothesis_template.format(label) for label in request.candidate_labels]
        premises = [self._visible_premise(request.sequence, options)] * len(hypotheses)
        full = self.tokenizer.encode(premises, hypotheses, truncation=None)
        too_long = [i for i, row in enumerate(full) if len(row) > self.max_tokens]
        if not too_long:
            return full
        longest = max(len(full[i]) for i in too_long)
        if not options.truncation:
            raise InputTooLarge(f"the sequence with its hypothesis is {longest} tokens; this model takes at most "
                                f"{self.max_tokens} (set truncation to cut the sequence to fit)",
                                metadata={"field": "sequence", "limit": str(self.max_tokens)})
        # The hypothesis alone must fit, with its special tokens and one premise token.
        premise_only = self.tokenizer.encode(premises[:1], truncation=None, add_special_tokens=False)[0]
        for i in too_long:
            if len(full[i]) - len(premise_only) >= self.max_tokens:
                raise InputTooLarge(f"the hypothesis for candidate label {request.candidate_labels[i]!r} is too "
                                    f"long: with the special tokens it leaves no room for the text in "
                                    f"{self.max_tokens} tokens", metadata={"field": "candidate_labels",
                                                                           "limit": str(self.max_tokens)})
        rows = self.tokenizer.encode(premises, hypotheses, max_length=self.max_tokens, truncation="only_first")
        return rows

    def _visible_premise(self, sequence: str, options: ZeroShotClassificationOptions) -> str:
        """`sequence`, or for a very long one its start: the whole words holding its first
        max_tokens tokens, which is all that truncation (only_first) can keep. Tokenizers split
        words independently, so the cut text starts with the same tokens."""
        if len(sequence) <= self.max_tokens * _CUT_BEYOND_CHARS_PER_TOKEN:
            return sequence
        alone = self.tokenizer.encode([sequence], truncation=None, add_special_tokens=False)[0]
        if len(alone) <= self.max_tokens:
            return sequence
        if not options.truncation:
            raise InputTooLarge(f"the sequence is {len(alone)} tokens; this model takes at most {self.max_tokens} "
                                f"with its hypothesis (set truncation to cut the sequence to fit)",
                                metadata={"field": "sequence", "limit": str(self.max_tokens)})
        last_word = alone.word_ids[self.max_tokens - 1]
        for k in range(self.max_tokens, len(alone)):
            if alone.word_ids[k] != last_word:
                return sequence[:alone.offsets[k][0]]
        return sequence

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> np.ndarray:
        """Pairs -> logits [N, num_labels] float32 numpy, in padded batches."""
        out = []
        for lo in range(0, len(rows), self.max_batch_size):
            batch = self.tokenizer.pad(rows[lo:lo + self.max_batch_size], self.device)
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            if self._takes_token_types and batch.token_type_ids is not None:
                inputs["token_type_ids"] = batch.token_type_ids
            out.append(self.model(**inputs).float().cpu().numpy())
        return np.concatenate(out)

    def postprocess(self, request: ZeroShotRequest, logits: np.ndarray,
                    options: ZeroShotClassificationOptions) -> ZeroShotResult:
        """transformers' postprocess for one sequence: logits [n_labels, num_classes]."""
        labels = request.candidate_labels
        reshaped = logits.reshape((1, len(labels), -1))
        if options.multi_label or len(labels) == 1:
            pair = reshaped[..., [self.contradiction_id, self.entailment_id]]
            exp = np.exp(pair - pair.max(-1, keepdims=True))  # = np.exp(pair) / sum, without overflow
            scores = (exp / exp.sum(-1, keepdims=True))[..., 1]
        else:
            entail = reshaped[..., self.entailment_id]
            exp = np.exp(entail - entail.max(-1, keepdims=True))
            scores = exp / exp.sum(-1, keepdims=True)
        order = list(reversed(scores[0].argsort()))
        return ZeroShotResult(request.sequence, [(labels[i], float(scores[0, i])) for i in order])

    # -- call ------------------------------------------------------------------------------

    def classify(self, requests: list[ZeroShotRequest],
                 options: ZeroShotClassificationOptions | Mapping[str, Any] | None = None) -> list[ZeroShotResult]:
        """Classifies each request's sequence against its labels; one result per request."""
        resolved = self.call_options(options)
        if not requests:
            raise InvalidInput("no sequences to classify", reason="EMPTY_INPUT")
        rows: list[Row] = []
        counts: list[int] = []
        for index, request in enumerate(requests):
            try:
                pairs = self.preprocess(request, resolved)
            except PipeserveError as error:
                if len(requests) > 1:
                    error.message = f"request {index}: {error.message}"
                    error.args = (error.message,)
                raise
            rows.extend(pairs)
            counts.append(len(pairs))
        logits = self.forward(rows)
        results, at = [], 0
        for request, count in zip(requests, counts):
            results.append(self.postprocess(request, logits[at:at + count], resolved))
            at += count
        return results

    run_batch = classify  # what the dynamic batcher runs (contracts.BatchedPipeline)


def entailment_id(label2id: dict[str, int]) -> int:
    """transformers' ZeroShotClassificationPipeline.entailment_id."""
    for label, index in label2id.items():
        if label.lower().startswith("entail"):
            return int(index)
    return -1
