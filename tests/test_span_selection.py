"""Answer-span selection shared by question answering and document QA."""
from __future__ import annotations

import numpy as np

from pipeserve.pipelines.span_selection import decode_spans


def test_top_k_equal_to_the_number_of_candidates_returns_them_all_sorted():
    """transformers 4.57's QA pipeline crashes here (argpartition kth out of bounds)."""
    start = np.array([[0.1, 0.6, 0.3]], dtype=np.float32)
    end = np.array([[0.2, 0.3, 0.5]], dtype=np.float32)
    context = np.array([1, 1, 1])
    starts, ends, scores = decode_spans(start, end, topk=9, max_answer_len=3, undesired_tokens=context)
    assert list(scores) == sorted(scores, reverse=True)
    assert len(scores) == 9  # every (start, end) pair; end < start ones score 0, as in transformers
    assert all(s <= e for s, e, score in zip(starts, ends, scores) if score > 0)
    assert (starts[0], ends[0]) == (1, 2)  # 0.6 * 0.5
    fewer = decode_spans(start, end, topk=2, max_answer_len=3, undesired_tokens=context)
    assert list(zip(fewer[0], fewer[1])) == list(zip(starts[:2], ends[:2]))


def test_spans_outside_the_context_and_too_long_are_dropped():
    start = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    end = np.array([[0.1, 0.1, 0.8]], dtype=np.float32)
    starts, ends, _ = decode_spans(start, end, topk=5, max_answer_len=2, undesired_tokens=np.array([0, 1, 1]))
    assert all(s >= 1 and e >= 1 and e - s < 2 for s, e in zip(starts, ends))
