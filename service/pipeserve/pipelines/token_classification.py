"""token-classification (NER): a text -> labelled tokens or entity groups with character
offsets into the original text (Unicode code points).

Ports transformers.pipelines.token_classification.TokenClassificationPipeline (v5):
gather_pre_entities (special tokens skipped, subword detection: the tokenizer's
continuing_subword_prefix when it has one, else the whitespace heuristic; [UNK] takes the
original text), aggregate / aggregate_words / group_entities / group_sub_entities, the
overlapping-window merge of `stride`, and numpy float32 scores.
- The text is truncated to the model's maximum, as transformers does whenever the tokenizer
  has a model_max_length; `stride` instead splits a long text into overlapping windows (it
  needs an aggregation strategy other than none, and must be below the maximum).
- Empty text is INVALID_INPUT (EMPTY_INPUT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import InvalidParameter
from ..inputs.text import Row
from ..tasks import Task
from .encoder_base import EncoderPipeline, check_text
from .options import TaskOptions

STRATEGIES = ("none", "simple", "first", "average", "max")


@dataclass(frozen=True)
class Entity:
    """A token (strategy none: `index` set, `entity` is its label) or an entity group."""

    entity: str
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


@dataclass(frozen=True)
class TokenClassificationOptions(TaskOptions):
    aggregation_strategy: str = "none"
    ignore_labels: tuple[str, ...] | None = None  # None: ("O",)
    stride: int | None = None  # None: one window, truncated


class TokenClassificationPipeline(EncoderPipeline):
    task: ClassVar[Task] = Task.TOKEN_CLASSIFICATION
    head: ClassVar[str] = "token_classification"
    per_token_outputs: ClassVar[tuple[bool, ...]] = (True,)
    options_type: ClassVar[type[TaskOptions]] = TokenClassificationOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.id2label = dict(self.config.id2label)
        self.settle_defaults()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        strategy = str(options.get("aggregation_strategy") or "none").strip().lower()
        if strategy in ("", "unspecified", "default"):
            strategy = "none"
        if strategy not in STRATEGIES:
            raise InvalidParameter(f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
                                   metadata={"field": "aggregation_strategy"})
        options["aggregation_strategy"] = strategy
        labels = options.get("ignore_labels")
        # An empty list (proto's unset repeated field) means the default, which ignores "O".
        options["ignore_labels"] = list(labels) if labels else ["O"]
        stride = options.get("stride")
        if stride is not None:
            if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 0:
                raise InvalidParameter(f"stride must be a non-negative integer, got {stride!r}",
                                       metadata={"field": "stride"})
            if stride >= self.max_length:
                raise InvalidParameter(f"stride must be less than the model's maximum length "
                                       f"{self.max_length}, got {stride}", metadata={"field": "stride"})
            if strategy == "none":
                raise InvalidParameter("stride splits the text into windows whose results are merged by "
                                       "entity; choose an aggregation_strategy other than none",
                                       metadata={"field": "stride"})
            options["stride"] = int(stride)
        return options

    # -- transformers' post-processing, one window at a time -------------------------------

    def gather_pre_entities(self, sentence: str, row: Row, scores: np.ndarray) -> list[dict]:
        pre_entities = []
        for idx, token_scores in enumerate(scores):
            if row.special_mask[idx]:
                continue
            word = self.tokenizer.id_to_token(row.ids[idx])
            start, end = row.offsets[idx]
            word_ref = sentence[start:end]
            if self.tokenizer.continuing_subword_prefix:
                is_subword = len(word) != len(word_ref)
            else:
                # transformers' fallback heuristic for tokenizers without word markers.
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if row.ids[idx] == self.tokenizer.unk_token_id:
                word = word_ref
                is_subword = False
            pre_entities.append({"word": word, "scores": token_scores, "start": start, "end": end,
                                 "index": idx, "is_subword": is_subword})
        return pre_entities

    def aggregate(self, pre_entities: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for pre in pre_entities:
                idx = pre["scores"].argmax()
                entities.append({"entity": self.id2label[idx], "score": pre["scores"][idx], "index": pre["index"],
                                 "word": pre["word"], "start": pre["start"], "end": pre["end"]})
        else:
            entities = self.aggregate_words(pre_entities, strategy)
        if strategy == "none":
            return entities
        return self.group_entities(entities)

    def aggregate_word(self, entities: list[dict], strategy: str) -> dict:
        word = self.tokenizer.convert_tokens_to_string([e["word"] for e in entities])
        if strategy == "first":
            scores = entities[0]["scores"]
            idx = scores.argmax()
            score, label = scores[idx], self.id2label[idx]
        elif strategy == "max":
            scores = max(entities, key=lambda e: e["scores"].max())["scores"]
            idx = scores.argmax()
            score, label = scores[idx], self.id2label[idx]
        else:  # average
            average = np.nanmean(np.stack([e["scores"] for e in entities]), axis=0)
            idx = average.argmax()
            score, label = average[idx], self.id2label[idx]
        return {"entity": label, "score": score, "word": word, "start": entities[0]["start"],
                "end": entities[-1]["end"]}

    def aggregate_words(self, entities: list[dict], strategy: str) -> list[dict]:
        words, group = [], None
        for entity in entities:
            if group is None:
                group = [entity]
            elif entity["is_subword"]:
                group.append(entity)
            else:
                words.append(self.aggregate_word(group, strategy))
                group = [entity]
        if group is not None:
            words.append(self.aggregate_word(group, strategy))
        return words

    def group_sub_entities(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": np.mean(np.nanmean([e["score"] for e in entities])),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}

    @staticmethod
    def get_tag(name: str) -> tuple[str, str]:
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name  # not in B-/I- format: a continuation

    def group_entities(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for entity in entities:
            if not current:
                current.append(entity)
                continue
            bi, tag = self.get_tag(entity["entity"])
            _, last_tag = self.get_tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(entity)
            else:
                groups.append(self.group_sub_entities(current))
                current = [entity]
        if current:
            groups.append(self.group_sub_entities(current))
        return groups

    @staticmethod
    def aggregate_overlapping_entities(entities: list[dict]) -> list[dict]:
        if not entities:
            return entities
        entities = sorted(entities, key=lambda e: e["start"])
        merged, previous = [], entities[0]
        for entity in entities:
            if previous["start"] <= entity["start"] < previous["end"]:
                length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
                if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                    previous = entity
            else:
                merged.append(previous)
                previous = entity
        merged.append(previous)
        return merged

    # -- call ------------------------------------------------------------------------------

    def postprocess(self, sentence: str, windows: list[tuple[Row, np.ndarray]],
                    options: TokenClassificationOptions) -> list[Entity]:
        strategy, ignore = options.aggregation_strategy, options.ignore_labels
        found = []
        for row, logits in windows:
            shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
            grouped = self.aggregate(self.gather_pre_entities(sentence, row, scores), strategy)
            found.extend(e for e in grouped if e.get("entity") not in ignore and e.get("entity_group") not in ignore)
        if len(windows) > 1:
            found = self.aggregate_overlapping_entities(found)
        return [Entity(entity=e.get("entity_group", e.get("entity")), score=float(e["score"]), word=e["word"],
                       start=int(e["start"]), end=int(e["end"]),
                       index=int(e["index"]) if strategy == "none" else None) for e in found]

    def classify(self, texts: list[str],
                 options: TokenClassificationOptions | Mapping[str, Any] | None = None) -> list[list[Entity]]:
        """Entities of each text, in order of position; batched texts give the same results."""
        resolved = self.call_options(options)
        texts = [check_text(t) for t in texts]
        stride = resolved.stride
        rows = self.tokenizer.encode(texts, max_length=self.max_length, truncation="longest_first",
                                     stride=stride or 0, overflow=stride is not None)
        outputs = self.run_rows(rows)
        per_text: list[list[tuple[Row, np.ndarray]]] = [[] for _ in texts]
        for row, (logits,) in zip(rows, outputs):
            per_text[row.source].append((row, logits.numpy()))
        return [self.postprocess(text, windows, resolved) for text, windows in zip(texts, per_text)]

    run_batch = classify  # what the dynamic batcher runs (contracts.BatchedPipeline)
