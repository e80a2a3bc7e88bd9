"""text-classification: a text (or text pair) -> (label, score) pairs, best first.

Ports transformers.pipelines.text_classification.TextClassificationPipeline (v5):
- function_to_apply: unset = the config's rule (regression -> none; multi-label or a single
  label -> sigmoid; otherwise softmax); scores computed in numpy float32 as transformers does.
- top_k: transformers returns one {label, score} (the argmax) when top_k is not passed (the
  "legacy" shape), and the top_k best sorted by score when it is. Here both shapes are a list:
  unset -> [best label]; k -> the k best (all labels when k >= num_labels). top_k <= 0 is
  INVALID_PARAMETER (transformers would silently return nothing).
- Length: transformers' pipeline does not truncate unless `truncation=True` is passed, and
  an over-long input fails inside the model. Here an over-long input is INPUT_TOO_LARGE
  (INVALID_ARGUMENT) with the limit in the message, unless the model was loaded with the
  default option truncation=true, which truncates (longest_first) to the model's maximum.
- Empty text is INVALID_INPUT (EMPTY_INPUT); transformers would classify "[CLS] [SEP]".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..tasks import Task
from .classification import check_function, default_function, ranked_labels
from .encoder_base import EncoderPipeline, check_positive, check_text
from .options import TaskOptions

Result = list[tuple[str, float]]


@dataclass(frozen=True)
class TextInput:
    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class TextClassificationOptions(TaskOptions):
    top_k: int | None = None  # None: transformers' legacy single best label
    function_to_apply: str | None = None  # None: the config's rule
    truncation: bool = False


class TextClassificationPipeline(EncoderPipeline):
    task: ClassVar[Task] = Task.TEXT_CLASSIFICATION
    head: ClassVar[str] = "sequence_classification"
    per_token_outputs: ClassVar[tuple[bool, ...]] = (False,)
    options_type: ClassVar[type[TaskOptions]] = TextClassificationOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.id2label = dict(self.config.id2label)
        self.num_labels = len(self.id2label)
        self.problem_type = self.files.config.get("problem_type")
        self.settle_defaults()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        check_positive(options, "top_k")
        check_function(options)
        options["truncation"] = bool(options.get("truncation"))
        return options

    def default_function(self) -> str:
        return default_function(self.problem_type, self.num_labels)

    def encode(self, inputs: list[TextInput], options: TextClassificationOptions):
        texts = [check_text(i.text) for i in inputs]
        pairs = [check_text(i.text_pair, "text_pair") if i.text_pair is not None else None for i in inputs]
        truncation = "longest_first" if options.truncation else None
        rows = []
        # Pairs and single texts cannot share one encode call (the post-processor differs).
        for index, (text, pair) in enumerate(zip(texts, pairs)):
            [row] = self.tokenizer.encode([text], None if pair is None else [pair],
                                          max_length=self.max_length, truncation=truncation)
            rows.append(row)
        self.check_length(rows, "; load the model with truncation=true to truncate")
        return rows

    def postprocess(self, logits: torch.Tensor, options: TextClassificationOptions) -> Result:
        function = options.function_to_apply or self.default_function()
        return ranked_labels(logits, function, self.id2label)[:options.top_k or 1]

    def classify(self, inputs: list[TextInput | str],
                 options: TextClassificationOptions | Mapping[str, Any] | None = None) -> list[Result]:
        """One result per input, in order; batched rows give the same results as one at a time."""
        resolved = self.call_options(options)
        inputs = [TextInput(i) if isinstance(i, str) else i for i in inputs]
        rows = self.encode(inputs, resolved)
        return [self.postprocess(out[0], resolved) for out in self.run_rows(rows)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_labels": self.num_labels}

    run_batch = classify  # what the dynamic batcher runs (contracts.BatchedPipeline)
