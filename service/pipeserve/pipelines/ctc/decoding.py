"""CTC greedy decoding with a character vocabulary, as Wav2Vec2CTCTokenizer decodes.

Reads the tokenizer from vocab.json + tokenizer_config.json (Wav2Vec2 checkpoints have no
tokenizer.json). Decoding ports transformers/models/wav2vec2/tokenization_wav2vec2.py:
`Wav2Vec2CTCTokenizer.convert_tokens_to_string` (group repeated tokens, drop the blank/pad
token, the word delimiter becomes a space), `_compute_offsets` (char offsets in frames) and
`_get_word_offsets` (word offsets from char offsets). Offsets are in logit frames; a pipeline
turns them into seconds with the model's inputs_to_logits_ratio.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import groupby
from typing import Sequence

from ...errors import ModelLoadFailed


@dataclass(frozen=True)
class CharOffset:
    char: str
    start_offset: int  # first frame of the (grouped) token
    end_offset: int  # one past its last frame


@dataclass(frozen=True)
class WordOffset:
    word: str
    start_offset: int
    end_offset: int


@dataclass(frozen=True)
class CTCDecoded:
    text: str
    char_offsets: list[CharOffset] = field(default_factory=list)
    word_offsets: list[WordOffset] = field(default_factory=list)


# The tokenizer_config.json defaults of Wav2Vec2CTCTokenizer.__init__.
_DEFAULTS = {
    "pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|",
    "replace_word_delimiter_char": " ", "do_lower_case": False, "clean_up_tokenization_spaces": False,
}


def _token_text(value) -> str | None:
    """Special tokens are saved as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass(frozen=True)
class CTCVocabulary:
    """A character vocabulary: id -> token string, plus the tokens decoding treats specially."""

    id_to_token: dict[int, str]
    pad_token: str = "<pad>"  # the CTC blank
    unk_token: str = "<unk>"
    word_delimiter_token: str = "|"
    replace_word_delimiter_char: str = " "
    do_lower_case: bool = False
    clean_up_tokenization_spaces: bool = False

    @classmethod
    def from_files(cls, files) -> "CTCVocabulary":
        """vocab.json (flat, or nested per language with tokenizer_config's target_lang) +
        tokenizer_config.json / special_tokens_map.json / added_tokens.json."""
        try:
            vocab = files.read_json("vocab.json")
            config = files.read_json("tokenizer_config.json") or {}
            special = files.read_json("special_tokens_map.json") or {}
            added = files.read_json("added_tokens.json") or {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadFailed(f"tokenizer files of {files.path} are not valid JSON: {exc}",
                                  reason="BAD_TOKENIZER") from None
        if not vocab:
            raise ModelLoadFailed(f"{files.path} has no vocab.json: a CTC model needs its character vocabulary",
                                  reason="TOKENIZER_MISSING")
        target_lang = config.get("target_lang")
        if target_lang:
            if target_lang not in vocab:
                raise ModelLoadFailed(f"target_lang {target_lang!r} is not in vocab.json", reason="BAD_TOKENIZER")
            vocab = vocab[target_lang]
        if any(not isinstance(v, int) for v in vocab.values()):
            raise ModelLoadFailed("vocab.json is nested per language but tokenizer_config.json sets no target_lang",
                                  reason="BAD_TOKENIZER")
        id_to_token = {int(i): t for t, i in vocab.items()}
        # Tokens added beyond vocab.json (Wav2Vec2CTCTokenizer.convert_ids_to_tokens prefers vocab.json).
        for token, index in added.items():
            id_to_token.setdefault(int(index), token)
        for index, token in (config.get("added_tokens_decoder") or {}).items():
            id_to_token.setdefault(int(index), _token_text(token))
        options = {}
        for key, default in _DEFAULTS.items():
            value = config.get(key, special.get(key, default))
            value = _token_text(value)
            options[key] = default if value is None and key != "word_delimiter_token" else value
        return cls(id_to_token=id_to_token, **options)

    def token(self, index: int) -> str:
        return self.id_to_token.get(int(index), self.unk_token)

    def decode(self, ids: Sequence[int], *, offsets: bool = False) -> CTCDecoded:
        """Greedy CTC ids (one per frame) -> text, and char + word offsets in frames when asked
        (Wav2Vec2CTCTokenizer.decode(ids, output_char_offsets=True, output_word_offsets=True))."""
        tokens = [self.token(i) for i in ids]
        if not tokens:
            return CTCDecoded("")
        groups = [(token, sum(1 for _ in run)) for token, run in groupby(tokens)]
        chars = [t for t, _ in groups if t != self.pad_token]
        chars = [self.replace_word_delimiter_char if t == self.word_delimiter_token else t for t in chars]
        text = "".join(chars).strip()
        if self.do_lower_case:
            text = text.lower()
        if self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        if not offsets:
            return CTCDecoded(text)
        char_offsets, start, i = [], 0, 0
        for token, repeats in groups:
            if token != self.pad_token:
                char_offsets.append(CharOffset(chars[i], start, start + repeats))
                i += 1
            start += repeats
        return CTCDecoded(text, char_offsets, word_offsets(char_offsets, self.replace_word_delimiter_char))


def word_offsets(char_offsets: Sequence[CharOffset], delimiter: str = " ") -> list[WordOffset]:
    """Wav2Vec2CTCTokenizer._get_word_offsets: runs of non-delimiter chars become words."""
    words: list[WordOffset] = []
    last_state, word, start, end = "SPACE", "", 0, 0
    for offset in char_offsets:
        state = "SPACE" if offset.char == delimiter else "WORD"
        if state == last_state:
            end = offset.end_offset
            word += offset.char
        elif state == "SPACE":
            words.append(WordOffset(word, start, end))
        else:
            start, end, word = offset.start_offset, offset.end_offset, offset.char
        last_state = state
    if last_state == "WORD":
        words.append(WordOffset(word, start, end))
    return words


def clean_up_tokenization(text: str) -> str:
    """PreTrainedTokenizerBase.clean_up_tokenization."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


@dataclass
class _Group:
    token: str  # the vocabulary token of a run of equal frames
    id: int  # its id (the first frame's, when distinct ids share a token string)
    start: int  # first frame
    frames: int


class CTCStreamDecoder:
    """Greedy CTC over a growing sequence of frame ids, giving the same chars and offsets as
    `CTCVocabulary.decode` on the whole sequence: runs are grouped as ids arrive, and every run
    but the last is stable (the next frames can only extend the last run)."""

    def __init__(self, vocab: CTCVocabulary):
        self.vocab = vocab
        self.groups: list[_Group] = []
        self.frames = 0  # frames pushed so far
        self.logprob_sum: list[float] = []  # per group: sum of the chosen frames' log probabilities
        self.dropped_text = ""  # raw chars of runs dropped by `drop` (bounded memory for long streams)

    def push(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        for k, index in enumerate(ids):
            token = self.vocab.token(index)
            lp = float(logprobs[k]) if logprobs is not None else 0.0
            last = self.groups[-1] if self.groups else None
            if last is not None and last.token == token:
                last.frames += 1
                self.logprob_sum[-1] += lp
            else:
                self.groups.append(_Group(token, int(index), self.frames, 1))
                self.logprob_sum.append(lp)
            self.frames += 1

    def chars(self, first_group: int = 0, end_group: int | None = None) -> list[tuple[CharOffset, int, float]]:
        """(char offset, token id, summed log probability) of the non-blank runs in
        groups[first_group:end_group] (to the end when None)."""
        end = len(self.groups) if end_group is None else end_group
        out = []
        for g, lp in zip(self.groups[first_group:end], self.logprob_sum[first_group:end]):
            if g.token == self.vocab.pad_token:
                continue
            char = self.vocab.replace_word_delimiter_char if g.token == self.vocab.word_delimiter_token else g.token
            out.append((CharOffset(char, g.start, g.start + g.frames), g.id, lp))
        return out

    def drop(self, n_groups: int) -> None:
        """Forgets the first `n_groups` runs (already reported), keeping their text for `text()`.
        Offsets of the remaining runs stay absolute."""
        self.dropped_text += "".join(c.char for c, _, _ in self.chars(0, n_groups))
        del self.groups[:n_groups], self.logprob_sum[:n_groups]

    def tail(self, first_group: int) -> "CTCStreamDecoder":
        """A new decoder holding runs from `first_group` on, re-based to frame 0."""
        out = CTCStreamDecoder(self.vocab)
        base = self.groups[first_group].start if first_group < len(self.groups) else self.frames
        out.groups = [_Group(g.token, g.id, g.start - base, g.frames) for g in self.groups[first_group:]]
        out.logprob_sum = list(self.logprob_sum[first_group:])
        out.frames = self.frames - base
        return out

    def text(self) -> str:
        """The decoded text of everything pushed (CTCVocabulary.decode(...).text)."""
        text = (self.dropped_text + "".join(c.char for c, _, _ in self.chars())).strip()
        if self.vocab.do_lower_case:
            text = text.lower()
        if self.vocab.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text
