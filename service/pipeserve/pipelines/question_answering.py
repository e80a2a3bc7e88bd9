"""question-answering (extractive): a question and a context -> answer spans with scores and
character offsets into the context (Unicode code points).

transformers 5 removed this pipeline; this ports transformers 4.57's
pipelines/question_answering.py QuestionAnsweringPipeline (fast-tokenizer path), which is also
the test oracle: question-first windows of at most max_seq_len tokens (truncation
only_second) overlapping by doc_stride, p_mask over everything but the context (CLS kept),
select_starts_ends / decode_spans in numpy float32, align_to_words through word ids, equal
answers (case-insensitive) merged by adding scores, handle_impossible_answer's null score.
Defaults: top_k 1, max_answer_len 15, max_seq_len min(model maximum, 384), doc_stride
min(max_seq_len // 2, 128), max_question_len 64, align_to_words true.
Differences, each a clear error instead of a crash or a silent choice:
- empty question or context: INVALID_INPUT (transformers: ValueError "cannot be empty");
- max_question_len is applied (the question is cut to that many tokens, as transformers'
  slow path does; its fast path ignores it);
- a doc_stride that leaves no room for new context in a window: INVALID_PARAMETER
  (transformers: a panic in the tokenizers library).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import InvalidInput, InvalidParameter
from ..inputs.text import Row
from ..tasks import Task
from .encoder_base import EncoderPipeline, check_positive, check_text
from .options import TaskOptions
from .span_selection import select_starts_ends


@dataclass(frozen=True)
class QAInput:
    question: str
    context: str


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float
    start: int
    end: int


def _word_chars(row: Row, word: int | None, sequence: int) -> tuple[int, int]:
    """tokenizers' Encoding.word_to_chars(word, sequence_index) on a Row."""
    if word is None:
        raise LookupError("special token")
    tokens = [i for i, (w, s) in enumerate(zip(row.word_ids, row.sequence_ids)) if w == word and s == sequence]
    if not tokens:
        raise LookupError("word not in sequence")
    return row.offsets[tokens[0]][0], row.offsets[tokens[-1]][1]


@dataclass(frozen=True)
class QuestionAnsweringOptions(TaskOptions):
    top_k: int = 1
    doc_stride: int | None = None  # None: min(max_seq_len // 2, 128)
    max_answer_len: int = 15
    max_seq_len: int | None = None  # None: min(the model's maximum, 384)
    max_question_len: int = 64
    handle_impossible_answer: bool = False
    align_to_words: bool = True


class QuestionAnsweringPipeline(EncoderPipeline):
    task: ClassVar[Task] = Task.QUESTION_ANSWERING
    head: ClassVar[str] = "question_answering"
    per_token_outputs: ClassVar[tuple[bool, ...]] = (True, True)
    options_type: ClassVar[type[TaskOptions]] = QuestionAnsweringOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cls_token_id = self.tokenizer.token_id("cls_token")
        self.settle_defaults()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for name in ("top_k", "max_answer_len", "max_seq_len", "max_question_len"):
            check_positive(options, name)
        if options.get("max_seq_len") is None:
            options["max_seq_len"] = min(self.max_length, 384)
        if options["max_seq_len"] > self.max_length:
            raise InvalidParameter(f"max_seq_len must be at most the model's maximum {self.max_length}, "
                                   f"got {options['max_seq_len']}", metadata={"field": "max_seq_len"})
        stride = options.get("doc_stride")
        if stride is None:
            stride = min(options["max_seq_len"] // 2, 128)
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 0:
            raise InvalidParameter(f"doc_stride must be a non-negative integer, got {stride!r}",
                                   metadata={"field": "doc_stride"})
        if stride > options["max_seq_len"]:
            raise InvalidParameter(f"doc_stride ({stride}) is larger than max_seq_len ({options['max_seq_len']})",
                                   metadata={"field": "doc_stride"})
        options["doc_stride"] = int(stride)
        options["handle_impossible_answer"] = bool(options.get("handle_impossible_answer"))
        options["align_to_words"] = bool(options.get("align_to_words", True))
        return options

    def _question(self, question: str, max_question_len: int) -> str:
        """The question cut to max_question_len tokens (at a token's end offset)."""
        [row] = self.tokenizer.encode([question], add_special_tokens=False, truncation=None)
        if len(row) <= max_question_len:
            return question
        return question[:row.offsets[max_question_len - 1][1]]

    def windows(self, items: list[QAInput], options: QuestionAnsweringOptions) -> list[Row]:
        questions = [self._question(check_text(i.question, "question"), options.max_question_len) for i in items]
        contexts = [check_text(i.context, "context") for i in items]
        max_seq_len, stride = options.max_seq_len, options.doc_stride
        specials = self.tokenizer.num_special_tokens(pair=True)
        for question in questions:
            [row] = self.tokenizer.encode([question], add_special_tokens=False, truncation=None)
            room = max_seq_len - specials - len(row)
            if room <= 0:
                raise InvalidInput(f"the question is {len(row)} tokens long, which leaves no room for the context "
                                   f"in max_seq_len={max_seq_len}; shorten it or lower max_question_len",
                                   reason="INPUT_TOO_LARGE", metadata={"field": "question"})
            if stride >= room:
                raise InvalidParameter(f"doc_stride ({stride}) must be less than the {room} context tokens a window "
                                       f"of max_seq_len={max_seq_len} holds with this question",
                                       metadata={"field": "doc_stride"})
        return self.tokenizer.encode(questions, contexts, max_length=max_seq_len, truncation="only_second",
                                     stride=stride, overflow=True)

    def postprocess(self, context: str, windows: list[tuple[Row, np.ndarray, np.ndarray]],
                    options: QuestionAnsweringOptions) -> list[Answer]:
        top_k, align = options.top_k, options.align_to_words
        min_null_score = 1000000  # large and positive
        answers: list[dict] = []
        for row, start, end in windows:
            # p_mask: 1 everywhere but the context; CLS stays selectable (null answer).
            p_mask = [int(s != 1) for s in row.sequence_ids]
            for i, token in enumerate(row.ids):
                if token == self.cls_token_id:
                    p_mask[i] = 0
            attention = np.ones((1, len(row)), dtype=np.int64)
            starts, ends, scores, min_null_score = select_starts_ends(
                start[None], end[None], p_mask, attention, min_null_score,
                top_k * 2 + 10 if align else top_k, options.handle_impossible_answer, options.max_answer_len)
            for s, e, score in zip(starts, ends, scores):
                if align:
                    try:
                        begin = _word_chars(row, row.word_ids[s], 1)[0]
                        finish = _word_chars(row, row.word_ids[e], 1)[1]
                    except LookupError:
                        begin, finish = row.offsets[s][0], row.offsets[e][1]
                else:
                    begin, finish = row.offsets[s][0], row.offsets[e][1]
                text = context[begin:finish]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same:
                    same["score"] += score.item()
                else:
                    answers.append({"score": score.item(), "start": begin, "end": finish, "answer": text})
        if options.handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return [Answer(answer=a["answer"], score=float(a["score"]), start=int(a["start"]), end=int(a["end"]))
                for a in answers]

    def answer(self, items: list[QAInput],
               options: QuestionAnsweringOptions | Mapping[str, Any] | None = None) -> list[list[Answer]]:
        """Answers, best first, for each (question, context); windows of all items run batched."""
        resolved = self.call_options(options)
        rows = self.windows(items, resolved)
        per_item: list[list] = [[] for _ in items]
        for row, (start, end) in zip(rows, self.run_rows(rows)):
            per_item[row.source].append((row, start.numpy(), end.numpy()))
        return [self.postprocess(item.context, windows, resolved) for item, windows in zip(items, per_item)]

    run_batch = answer  # what the dynamic batcher runs (contracts.BatchedPipeline)
