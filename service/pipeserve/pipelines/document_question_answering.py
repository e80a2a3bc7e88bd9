"""document-question-answering: a page image (or its words and boxes) and a question -> answer
spans of words with scores, for LayoutLM (v1) checkpoints such as impira/layoutlm-document-qa.

Ports transformers.pipelines.document_question_answering.DocumentQuestionAnsweringPipeline
(the LayoutLM path):
- words and boxes come from the client, or from Tesseract (inputs/ocr.py, = `apply_tesseract`);
- the question is split on whitespace and encoded with the words as a pre-tokenized pair,
  truncating only the words to `max_seq_len` and returning the overflow windows that overlap by
  `doc_stride` tokens (long documents);
- each token gets its word's box, [1000]*4 for [SEP] and [0]*4 for the question and [CLS];
- `select_starts_ends` / `decode_spans` are ported in numpy float32, so equal logits give equal
  answers; spans map back to word indices, answers of all windows are ranked together.

Windows of all queries in a call run through the model in padded batches; each window is
post-processed on its own unpadded length, exactly as the unbatched transformers pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InputTooLarge, InvalidInput, InvalidParameter, ModelLoadFailed, PipeserveError
from ..inputs.image import DEFAULT_MAX_PIXELS, decode_image
from ..inputs.ocr import Word, check_words, run_tesseract
from ..inputs.text import TextTokenizer
from ..tasks import Task
from .base import LoadOptions, load_family_model
from .encoder_base import TextModelPipeline
from .span_selection import select_starts_ends
from .options import TaskOptions

# A page has a few hundred words; this bounds the windows (forward passes) one request can ask for.
MAX_WORDS = 10_000
# Longest question accepted, in characters, before tokenizing it.
MAX_QUESTION_CHARS = 4_096


@dataclass(frozen=True)
class DocumentQuery:
    """A question about one page: the image's encoded bytes, or the page's words (or both; the
    words then win, as transformers' `word_boxes`)."""

    question: str
    image: bytes | None = None
    words: tuple[Word, ...] | None = None


@dataclass(frozen=True)
class DocumentAnswer:
    answer: str
    score: float
    start_word: int  # index into DocumentAnswers.words
    end_word: int  # inclusive


@dataclass(frozen=True)
class DocumentAnswers:
    answers: list[DocumentAnswer]
    words: list[Word] = field(default_factory=list)


@dataclass
class _Window:
    """One model input: a question + words window of one query."""

    query: int
    ids: list[int]
    type_ids: list[int]
    bbox: list[list[int]]
    p_mask: list[bool]
    word_ids: list[int | None]


@dataclass(frozen=True)
class DocumentQuestionAnsweringOptions(TaskOptions):
    # transformers' defaults; max_seq_len None = the tokenizer's model_max_length, doc_stride
    # None = min(max_seq_len // 2, 256), ocr_lang "eng" = Tesseract's default language.
    top_k: int = 1
    max_answer_len: int = 15
    doc_stride: int | None = None
    max_seq_len: int | None = None
    max_question_len: int = 64
    handle_impossible_answer: bool = False
    ocr_lang: str = "eng"


class DocumentQuestionAnsweringPipeline(TextModelPipeline):
    task: ClassVar[Task] = Task.DOCUMENT_QUESTION_ANSWERING
    head: ClassVar[str] = "question_answering"
    options_type: ClassVar[type[TaskOptions]] = DocumentQuestionAnsweringOptions
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Windows per forward pass (bounds activation memory of a long document).
    max_batch_size: int = 16

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module, tokenizer):
        super().__init__(files, options, model, tokenizer)
        config = files.config
        # Longest input the position table allows; the tokenizer's own limit when smaller.
        self.max_tokens = tokenizer.limit(int(config.get("max_position_embeddings", 512)))
        self.cls_token_id = tokenizer.token_id("cls_token")
        self.sep_token_id = tokenizer.token_id("sep_token")
        self.settle_defaults()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "DocumentQuestionAnsweringPipeline":
        model_type = files.config.get("model_type", "")
        if model_type != "layoutlm":
            raise ModelLoadFailed(f"document question answering serves LayoutLM (v1) checkpoints, not "
                                  f"{model_type!r}", reason="UNSUPPORTED_FAMILY")
        tokenizer = TextTokenizer.from_files(files)
        if tokenizer.config.get("padding_side", "right") != "right":
            raise ModelLoadFailed("document question answering needs a tokenizer that pads on the right",
                                  reason="BAD_TOKENIZER")
        if tokenizer.token_id("sep_token") is None:
            raise ModelLoadFailed("document question answering needs a tokenizer with a sep token",
                                  reason="BAD_TOKENIZER")
        model = load_family_model(files, options, cls.head)
        return cls(files, options, model, tokenizer)

    # -- options ---------------------------------------------------------------------------

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for name, low in (("top_k", 1), ("max_answer_len", 1), ("max_question_len", 1), ("max_seq_len", 8),
                          ("doc_stride", 0)):
            value = options.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidParameter(f"{name} must be an integer, got {value!r}", metadata={"field": name})
            if value < low:
                raise InvalidParameter(f"{name} must be at least {low}, got {value}", metadata={"field": name})
            options[name] = int(value)
        if options.get("max_seq_len") is not None and options["max_seq_len"] > self.max_tokens:
            raise InvalidParameter(f"max_seq_len {options['max_seq_len']} exceeds this model's maximum of "
                                   f"{self.max_tokens} tokens", metadata={"field": "max_seq_len",
                                                                          "limit": self.max_tokens})
        return options

    # -- steps -----------------------------------------------------------------------------

    def page_words(self, query: DocumentQuery, options: DocumentQuestionAnsweringOptions) -> list[Word]:
        """The words and boxes of the page: the client's, else Tesseract's."""
        if query.words is not None and len(query.words) > 0:
            words = list(query.words)
            check_words(words)
        elif query.image:
            image = decode_image(bytes(query.image), max_pixels=self.max_pixels)
            words = run_tesseract(image, lang=options.ocr_lang)
            if not words:
                raise InvalidInput("OCR found no text in the image, so there is nothing to answer from",
                                   reason="NO_TEXT_FOUND")
        else:
            raise InvalidInput("send a document image or its words: the request has neither",
                               reason="EMPTY_INPUT", metadata={"field": "image"})
        if len(words) > MAX_WORDS:
            raise InputTooLarge(f"the document has {len(words)} words; at most {MAX_WORDS} are accepted",
                                metadata={"limit": str(MAX_WORDS)})
        return words

    def windows(self, index: int, question: str, words: list[Word],
                options: DocumentQuestionAnsweringOptions) -> list[_Window]:
        """Question + words -> overlapping windows (transformers' preprocess for LayoutLM)."""
        if not question.strip():
            raise InvalidInput("the question is empty", reason="EMPTY_INPUT", metadata={"field": "question"})
        if len(question) > MAX_QUESTION_CHARS:
            raise InputTooLarge(f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS} "
                                "are accepted", metadata={"field": "question", "limit": str(MAX_QUESTION_CHARS)})
        max_seq_len = options.max_seq_len or self.max_tokens
        doc_stride = options.doc_stride if options.doc_stride is not None else min(max_seq_len // 2, 256)
        question_words = question.split()
        question_tokens = len(self._encode_words([(question_words, None)], None, 0)[0].ids)
        if question_tokens > options.max_question_len:
            raise InputTooLarge(f"the question is {question_tokens} tokens long; max_question_len is "
                                f"{options.max_question_len}", metadata={"field": "question"})
        # Room for words in each window: what the question and the special tokens leave.
        room = max_seq_len - question_tokens - self.tokenizer.num_special_tokens(pair=True)
        if room < 1:
            raise InputTooLarge(f"the question ({question_tokens} tokens) leaves no room for the document in "
                                f"a window of max_seq_len={max_seq_len} tokens", metadata={"field": "question"})
        if doc_stride >= room:
            raise InvalidParameter(f"doc_stride {doc_stride} must be smaller than the {room} document tokens "
                                   f"that fit in each window (max_seq_len={max_seq_len})",
                                   metadata={"field": "doc_stride"})
        encodings = self._encode_words([(question_words, [w.text for w in words])], max_seq_len, doc_stride)
        sep, cls = self.sep_token_id, self.cls_token_id
        out = []
        for enc in encodings:
            # p_mask: True where a token cannot be in an answer (question, specials), but [CLS]
            # stays selectable (some models use it to say "no answer").
            p_mask = [seq != 1 for seq in enc.sequence_ids]
            bbox = []
            for i, (token, seq, word) in enumerate(zip(enc.ids, enc.sequence_ids, enc.word_ids)):
                if cls is not None and token == cls:
                    p_mask[i] = False
                if seq == 1:
                    bbox.append(list(words[word].box))
                elif token == sep:
                    bbox.append([1000] * 4)
                else:
                    bbox.append([0] * 4)
            out.append(_Window(index, list(enc.ids), list(enc.type_ids), bbox, p_mask, list(enc.word_ids)))
        return out

    def _encode_words(self, inputs: list[tuple[list[str], list[str] | None]], max_length: int | None,
                      stride: int) -> list[Any]:
        """Pre-tokenized (is_split_into_words) encoding, truncating only the words, with the
        overflow windows: what transformers' fast tokenizer does for LayoutLM here. A pair
        encodes with its special tokens; a lone question (counting its tokens) without.

        TextTokenizer.encode has no pre-tokenized mode yet, so this borrows its configured
        Rust tokenizer (one per truncation setting, thread-safe) and encodes the words directly.
        """
        tok = self.tokenizer._tokenizer(max_length, "only_second" if max_length else None, stride)
        pair = inputs[0][1] is not None
        batch = [(q, w) if pair else q for q, w in inputs]
        try:
            encodings = tok.encode_batch(batch, is_pretokenized=True, add_special_tokens=pair)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: B036 - the Rust side panics on impossible truncation
            raise InvalidInput(f"cannot tokenize the document with max_seq_len={max_length}, "
                               f"doc_stride={stride}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        return [window for e in encodings for window in [e] + list(e.overflowing)]

    @torch.inference_mode()
    def forward(self, windows: list[_Window]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Windows -> (start, end) logits per window, unpadded, float32 numpy."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        pad = self.tokenizer.pad_token_id
        for lo in range(0, len(windows), self.max_batch_size):
            chunk = windows[lo:lo + self.max_batch_size]
            width = max(len(w.ids) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            type_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            bbox = torch.zeros((len(chunk), width, 4), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, w in enumerate(chunk):
                n = len(w.ids)
                ids[row, :n] = torch.tensor(w.ids)
                type_ids[row, :n] = torch.tensor(w.type_ids)
                bbox[row, :n] = torch.tensor(w.bbox)
                mask[row, :n] = 1
            start, end = self.model(ids.to(self.device), bbox.to(self.device), mask.to(self.device),
                                    type_ids.to(self.device))
            start, end = start.float().cpu().numpy(), end.float().cpu().numpy()
            for row, w in enumerate(chunk):
                out.append((start[row, :len(w.ids)], end[row, :len(w.ids)]))
        return out

    def postprocess(self, windows: list[_Window], logits: list[tuple[np.ndarray, np.ndarray]],
                    words: list[Word], options: DocumentQuestionAnsweringOptions) -> list[DocumentAnswer]:
        """transformers' postprocess_extractive_qa over one query's windows, then the top_k."""
        top_k, handle_impossible = options.top_k, bool(options.handle_impossible_answer)
        min_null_score = 1000000.0  # large and positive, as transformers starts it
        answers: list[DocumentAnswer] = []
        for window, (start, end) in zip(windows, logits):
            attention = np.ones((1, len(window.ids)), dtype=np.int64)
            starts, ends, scores, min_null_score = select_starts_ends(
                start[None], end[None], window.p_mask, attention, min_null_score, top_k,
                handle_impossible, options.max_answer_len)
            for s, e, score in zip(starts, ends, scores):
                first, last = window.word_ids[s], window.word_ids[e]
                if first is not None and last is not None:
                    text = " ".join(w.text for w in words[first:last + 1])
                    answers.append(DocumentAnswer(text, float(score), first, last))
        if handle_impossible:
            answers.append(DocumentAnswer("", float(min_null_score), 0, 0))
        answers.sort(key=lambda a: a.score, reverse=True)  # stable, as transformers' sorted()
        return answers[:top_k]

    # -- call ------------------------------------------------------------------------------

    def answer(self, queries: list[DocumentQuery],
               options: DocumentQuestionAnsweringOptions | Mapping[str, Any] | None = None) -> list[DocumentAnswers]:
        """Answers each query; one result per query, in order."""
        resolved = self.call_options(options)
        if not queries:
            raise InvalidInput("no questions to answer", reason="EMPTY_INPUT")
        pages: list[list[Word]] = []
        windows: list[_Window] = []
        for index, query in enumerate(queries):
            try:
                words = self.page_words(query, resolved)
                windows.extend(self.windows(index, query.question, words, resolved))
            except PipeserveError as error:
                if len(queries) > 1:
                    error.message = f"query {index}: {error.message}"
                    error.args = (error.message,)
                raise
            pages.append(words)
        logits = self.forward(windows)
        results = []
        for index, words in enumerate(pages):
            mine = [(w, l) for w, l in zip(windows, logits) if w.query == index]
            answers = self.postprocess([w for w, _ in mine], [l for _, l in mine], words, resolved)
            results.append(DocumentAnswers(answers, words))
        return results

    run_batch = answer  # what the dynamic batcher runs (contracts.BatchedPipeline)
