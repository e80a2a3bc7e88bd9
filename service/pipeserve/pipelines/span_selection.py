"""Answer-span selection shared by extractive and document question answering: transformers'
decode_spans / select_starts_ends over start and end logits of one window."""
from __future__ import annotations

import numpy as np


def decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int,
                 undesired_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ports transformers pipelines/question_answering.py decode_spans (and its twin in
    document_question_answering.py): the top spans of start x end probabilities with
    0 <= end - start < max_answer_len, inside the context."""
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) <= topk:  # transformers 4.57's `<` crashes argpartition when equal
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]


def select_starts_ends(start: np.ndarray, end: np.ndarray, p_mask: list[int], attention_mask: np.ndarray,
                       min_null_score: float = 1000000, top_k: int = 1, handle_impossible_answer: bool = False,
                       max_answer_len: int = 15):
    """Ports transformers' select_starts_ends: mask non-context tokens, softmax start and
    end separately, track the null (CLS) score, then decode_spans."""
    undesired_tokens = np.abs(np.array(p_mask) - 1) & attention_mask
    undesired_mask = undesired_tokens == 0.0
    start = np.where(undesired_mask, -10000.0, start)
    end = np.where(undesired_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # mask CLS
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score
