"""What the label classifiers (image and text classification) share: transformers'
function_to_apply option, its default rule, and the ranked (label, score) pairs it gives.
Scores are computed in numpy float32 exactly as transformers' postprocess does, so equal
logits give equal scores."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidParameter

FUNCTIONS = ("sigmoid", "softmax", "none")


def check_function(options: dict[str, Any]) -> None:
    """Normalises options["function_to_apply"] in place: a name of FUNCTIONS, or None (unset,
    "", "default" or "unspecified") for the model's default rule."""
    function = options.get("function_to_apply")
    if function is None:
        return
    name = str(function).strip().lower()
    if name in ("", "default", "unspecified"):
        name = None
    elif name not in FUNCTIONS:
        raise InvalidParameter(f"function_to_apply must be one of {', '.join(FUNCTIONS)} "
                               f"(or unset for the model's default), got {function!r}",
                               metadata={"field": "function_to_apply"})
    options["function_to_apply"] = name


def default_function(problem_type: str | None, num_labels: int) -> str:
    """transformers' rule: regression -> none; multi-label or one label -> sigmoid; else softmax."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def ranked_labels(logits: torch.Tensor, function: str, id2label: dict[int, str]) -> list[tuple[str, float]]:
    """One input's logits (num_labels,) -> every (label, score), best first."""
    outputs = logits.numpy()  # float32, as transformers' postprocess
    if function == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-outputs))
    elif function == "softmax":
        shifted = np.exp(outputs - np.max(outputs, axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
    else:
        scores = outputs
    pairs = [(id2label[i], score.item()) for i, score in enumerate(scores)]
    pairs.sort(key=lambda pair: pair[1], reverse=True)  # stable: ties keep label order, as argmax
    return pairs
