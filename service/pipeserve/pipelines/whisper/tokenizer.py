"""Whisper's tokenizer: byte-level BPE from tokenizer.json (the `tokenizers` library) plus
Whisper's special tokens, timestamp tokens (ids above <|notimestamps|>, 0.02 s apart) and
language codes; and the word grouping used for word timestamps.

Ports transformers/models/whisper/tokenization_whisper.py (LANGUAGES, get_prompt_ids,
_combine_tokens_into_words, _split_tokens_on_unicode, _split_tokens_on_spaces,
_merge_punctuations).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ...errors import InvalidParameter, ModelLoadFailed

# tokenization_whisper.LANGUAGES: code -> name, in token order (<|en|> is the first language token).
LANGUAGES: dict[str, str] = dict(item.split(":") for item in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
    "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
    "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
    "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
    "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi "
    "pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan ka:georgian "
    "be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek fo:faroese "
    "ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit lb:luxembourgish my:myanmar "
    "bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian ln:lingala ha:hausa ba:bashkir "
    "jw:javanese su:sundanese yue:cantonese").split())
LANGUAGES = {code: name.replace("_", " ") for code, name in LANGUAGES.items()}
TO_LANGUAGE_CODE = {name: code for code, name in LANGUAGES.items()}
# Languages written without spaces: words are split at unicode boundaries instead.
_UNSPACED = {"chinese", "japanese", "thai", "lao", "myanmar", "cantonese"}
PREPEND_PUNCTUATIONS = "\"'“¡¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


class WhisperTokenizer:
    """tokenizer.json + Whisper's special tokens, found by name so that English-only
    (<|endoftext|> = 50256) and multilingual (50257) vocabularies both work."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise ModelLoadFailed(f"cannot read {path}: {exc}", reason="BAD_TOKENIZER") from None
        # The added (special) tokens as the library parsed them: reading tokenizer.json (2 MB)
        # a second time in Python cost 0.07 CPU s of every Whisper load.
        self.added = {token.content: i for i, token in sorted(self.tokenizer.get_added_tokens_decoder().items())}
        need = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
        missing = [n for n in need if self.token_id(n) is None]
        if missing:
            raise ModelLoadFailed(f"{path} lacks Whisper special tokens {missing}", reason="BAD_TOKENIZER")
        self.eot = self.token_id("<|endoftext|>")
        self.sot = self.token_id("<|startoftranscript|>")
        self.no_timestamps = self.token_id("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1  # <|0.00|>; timestamps need no vocabulary entry
        self.translate = self.token_id("<|translate|>")
        self.transcribe = self.token_id("<|transcribe|>")
        self.sot_prev = self.token_id("<|startofprev|>")
        self.sot_lm = self.token_id("<|startoflm|>")
        self.no_speech = self.token_id("<|nocaptions|>") or self.token_id("<|nospeech|>")
        self.lang_to_id = {code: i for code in LANGUAGES if (i := self.token_id(f"<|{code}|>")) is not None}
        self.id_to_lang = {i: code for code, i in self.lang_to_id.items()}
        self.special_ids = frozenset(i for name, i in self.added.items() if name.startswith("<|") and i < self.timestamp_begin)

    def token_id(self, token: str) -> int | None:
        return self.added.get(token, self.tokenizer.token_to_id(token))

    @property
    def is_multilingual(self) -> bool:
        # English-only models use GPT-2's vocabulary, whose last entry (50256) is <|endoftext|>;
        # multilingual vocabularies have 50257 regular tokens and put <|endoftext|> after them.
        return self.eot != 50256

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        """tokenization_whisper.get_prompt_ids: <|startofprev|> + ' ' + stripped text."""
        if self.sot_prev is None:
            raise InvalidParameter("this tokenizer has no <|startofprev|> token, so it cannot take a prompt")
        return [self.sot_prev] + self.encode(" " + text.strip())

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special and timestamp tokens are dropped when skip_special."""
        ids = [int(i) for i in ids if 0 <= i < self.timestamp_begin]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_text_tokens(self, ids: list[int]) -> str:
        """tokenizer.decode(ids) as _decode_asr calls it (ids are already plain text tokens)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def language_code(self, language: str) -> str:
        """'en', 'English' or '<|en|>' -> 'en' (as generation_whisper.language_to_id accepts)."""
        key = language.strip().lower()
        if key.startswith("<|") and key.endswith("|>"):
            key = key[2:-2]
        key = TO_LANGUAGE_CODE.get(key, key)
        if key not in self.lang_to_id:
            raise InvalidParameter(f"unsupported language {language!r}; this model knows {sorted(self.lang_to_id)}")
        return key


def load_tokenizer(directory: Path) -> WhisperTokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadFailed(f"{directory} has no tokenizer.json", reason="BAD_TOKENIZER")
    return _cached(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _cached(path: str, _mtime: int) -> WhisperTokenizer:
    return WhisperTokenizer(Path(path))


# --- word grouping (tokenization_whisper._combine_tokens_into_words and helpers) ---

def combine_tokens_into_words(tok: WhisperTokenizer, tokens: list[int], language: str | None = None):
    """-> (words, word_tokens, token_indices)"""
    language = language or "english"
    if language in _UNSPACED:
        words, word_tokens, indices = _split_tokens_on_unicode(tok, tokens)
    else:
        words, word_tokens, indices = _split_tokens_on_spaces(tok, tokens)
    _merge_punctuations(words, word_tokens, indices, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
    return words, word_tokens, indices


def _split_tokens_on_unicode(tok: WhisperTokenizer, tokens: list[int]):
    decoded_full = tok.decode_text_tokens(tokens)
    replacement_char = "\ufffd"
    words, word_tokens, token_indices, current_tokens, current_indices = [], [], [], [], []
    unicode_offset = 0
    for token_idx, token in enumerate(tokens):
        current_tokens.append(token)
        current_indices.append(token_idx)
        decoded = tok.decode_text_tokens(current_tokens)
        if (replacement_char not in decoded
                or unicode_offset + decoded.index(replacement_char) >= len(decoded_full)
                or decoded_full[unicode_offset + decoded.index(replacement_char)] == replacement_char):
            words.append(decoded)
            word_tokens.append(current_tokens)
            token_indices.append(current_indices)
            current_tokens, current_indices = [], []
            unicode_offset += len(decoded)
    return words, word_tokens, token_indices


def _split_tokens_on_spaces(tok: WhisperTokenizer, tokens: list[int]):
    subwords, subword_tokens_list, subword_indices_list = _split_tokens_on_unicode(tok, tokens)
    words, word_tokens, token_indices = [], [], []
    for subword, subword_tokens, subword_indices in zip(subwords, subword_tokens_list, subword_indices_list):
        special = subword_tokens[0] >= tok.eot
        with_space = subword.startswith(" ")
        punctuation = subword.strip() in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
        if special or with_space or punctuation or len(words) == 0:
            words.append(subword)
            word_tokens.append(subword_tokens)
            token_indices.append(subword_indices)
        else:
            words[-1] = words[-1] + subword
            word_tokens[-1].extend(subword_tokens)
            token_indices[-1].extend(subword_indices)
    return words, word_tokens, token_indices


def _merge_punctuations(words, tokens, indices, prepended, appended):
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i].startswith(" ") and words[i].strip() in prepended:
            words[j] = words[i] + words[j]
            tokens[j] = tokens[i] + tokens[j]
            indices[j] = indices[i] + indices[j]
            words[i], tokens[i], indices[i] = "", [], []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i].endswith(" ") and words[j] in appended:
            words[i] += words[j]
            tokens[i] += tokens[j]
            indices[i] += indices[j]
            words[j], tokens[j], indices[j] = "", [], []
        else:
            i = j
        j += 1
    words[:] = [w for w in words if w]
    tokens[:] = [t for t in tokens if t]
    indices[:] = [x for x in indices if x]


# --- merging decoded windows into timed chunks (tokenization_whisper._decode_asr) ---

def find_longest_common_sequence(sequences: list[list[int]], times: list[list] | None = None):
    """tokenization_whisper._find_longest_common_sequence: stitches overlapping chunk token
    lists at their best-matching overlap (and the per-token times alongside, when given)."""
    left = sequences[0]
    left_times = times[0] if times else None
    total, total_times = [], []
    for seq_idx, right in enumerate(sequences[1:]):
        best, best_idx = 0.0, (len(left), len(left), 0, 0)
        for i in range(1, len(left) + len(right)):
            eps = i / 10000.0
            ls, le = max(0, len(left) - i), min(len(left), len(left) + len(right) - i)
            rs, re_ = max(0, i - len(left)), min(len(right), i)
            a, b = left[ls:le], right[rs:re_]
            if times:
                right_times = times[seq_idx + 1]
                matches = sum(1 for k, e in enumerate(a)
                              if e == b[k] and left_times[ls + k][:2] <= right_times[rs + k][:2])
            else:
                matches = sum(1 for x, y in zip(a, b) if x == y)
            matching = matches / i + eps
            if matches > 1 and matching > best:
                best, best_idx = matching, (ls, le, rs, re_)
        ls, le, rs, re_ = best_idx
        left_mid, right_mid = (le + ls) // 2, (re_ + rs) // 2
        total.extend(left[:left_mid])
        left = right[right_mid:]
        if times:
            total_times.extend(left_times[:left_mid])
            left_times = times[seq_idx + 1][right_mid:]
    total.extend(left)
    if times:
        total_times.extend(left_times)
    return total, total_times


class ChunkMerger:
    """tokenization_whisper._decode_asr, fed one model output (a chunk's tokens) at a time so
    that closed chunks can be streamed. A chunk closes at its end timestamp; with strides the
    overlap between neighbouring chunks is resolved by find_longest_common_sequence."""

    def __init__(self, tok: WhisperTokenizer, return_timestamps: bool | str, time_precision: float = 0.02,
                 segment_size: int = 1500):
        self.tok, self.rt, self.tp, self.segment_size = tok, return_timestamps, time_precision, segment_size
        self.tb = tok.timestamp_begin
        self.last_language = None
        self.chunk = self._new()
        self.time_offset = 0.0
        self.previous_tokens: list[list[int]] = []
        self.previous_times: list[list] = []
        self.skip = False

    def _new(self) -> dict:
        return {"language": self.last_language, "timestamp": [None, None], "text": "", "tokens": []}

    def _resolve(self) -> tuple[list[int], list]:
        tokens, times = find_longest_common_sequence(self.previous_tokens, self.previous_times if self.rt == "word" else None)
        return tokens, times

    def _close(self, tokens, times) -> dict:
        chunk = self.chunk
        chunk["text"] = self.tok.decode_text_tokens(tokens)
        chunk["tokens"] = tokens
        if self.rt == "word":
            words, _, indices = combine_tokens_into_words(self.tok, tokens, self.last_language)
            # A word's probability is the mean of its tokens' (openai-whisper's find_alignment).
            chunk["words"] = [{"text": w, "timestamp": (times[ix[0]][0], times[ix[-1]][1]),
                               "probability": sum(times[k][2] for k in ix) / len(ix)}
                              for w, ix in zip(words, indices)]
        return chunk

    def add(self, token_ids: list[int], stride: tuple[float, float, float] | None = None,
            token_times: list[float] | None = None, token_probs: list[float] | None = None) -> list[dict]:
        """One chunk's generated tokens (and, with strides, (chunk_len, left, right) seconds;
        for word timestamps each token's end time and probability); returns the chunks that
        closed."""
        tok, tb, tp = self.tok, self.tb, self.tp
        closed = []
        if token_ids and tok.sot_prev is not None and token_ids[0] == tok.sot_prev:  # _strip_prompt
            token_ids = token_ids[token_ids.index(tok.sot):] if tok.sot in token_ids else []
        last_timestamp = None
        first_timestamp = tb
        cur_max, prev_len, penultimate = 0.0, 0.0, 0.0
        chunk_len = stride_right = 0.0
        if stride is not None:
            chunk_len, stride_left, stride_right = stride
            self.time_offset -= stride_left
            right_stride_start = chunk_len - stride_right
            if stride_left:
                first_timestamp = stride_left / tp + tb
            if stride_right:
                for token in reversed(token_ids):
                    if token >= tb:
                        if last_timestamp is not None and (token - tb) * tp < right_stride_start:
                            break
                        last_timestamp = token
        current_tokens: list[int] = []
        current_times: list = []
        for i, token in enumerate(token_ids):
            if token in tok.special_ids:
                code = tok.id_to_lang.get(token)
                if code is not None:
                    language = LANGUAGES[code]
                    if self.last_language and language != self.last_language and not self.rt:
                        self.previous_tokens.append(current_tokens)
                        tokens, _ = find_longest_common_sequence(self.previous_tokens)
                        self.chunk["text"], self.chunk["tokens"] = tok.decode_text_tokens(tokens), tokens
                        closed.append(self.chunk)
                        self.previous_tokens, current_tokens = [], []
                        self.chunk = self._new()
                    self.chunk["language"] = language
                    self.last_language = language
            elif token >= tb:
                timestamp = float((token - tb) * tp)
                if timestamp < cur_max:
                    single_ending = i >= 2 and not (token_ids[i - 1] >= tb and token_ids[i - 2] >= tb)
                    if single_ending:
                        prev_len += tp * self.segment_size
                    else:
                        cur_max = penultimate
                        prev_len += penultimate
                penultimate = cur_max
                cur_max = timestamp
                time = round((token - tb) * tp + self.time_offset + prev_len, 2)
                if last_timestamp and token >= last_timestamp:
                    self.skip = True
                elif self.skip or (self.previous_tokens and token < first_timestamp):
                    self.skip = False
                elif self.chunk["timestamp"][0] is None:
                    self.chunk["timestamp"][0] = time
                elif time != self.chunk["timestamp"][0]:
                    self.chunk["timestamp"][1] = time
                    self.previous_tokens.append(current_tokens)
                    if self.rt == "word":
                        self.previous_times.append(current_times)
                    closed.append(self._close(*self._resolve()))
                    self.previous_tokens, current_tokens = [], []
                    self.previous_times, current_times = [], []
                    self.chunk = self._new()
            else:
                current_tokens.append(token)
                if self.rt == "word":
                    start = round((0.0 if i == 0 else token_times[i - 1]) + self.time_offset, 2)
                    current_times.append((start, round(token_times[i] + self.time_offset, 2),
                                          token_probs[i] if token_probs else 0.0))
        if stride is not None:
            self.time_offset += chunk_len - stride_right
        if current_tokens:
            self.previous_tokens.append(current_tokens)
            if self.rt == "word":
                self.previous_times.append(current_times)
        elif not any(p for p in self.previous_tokens):
            self.chunk = self._new()
            self.previous_tokens, self.previous_times = [], []
        return closed

    def pending(self) -> dict | None:
        """The open chunk as it stands (an interim result), or None."""
        if not any(p for p in self.previous_tokens):
            return None
        tokens, _ = find_longest_common_sequence(self.previous_tokens)
        return {**self.chunk, "text": self.tok.decode_text_tokens(tokens), "tokens": tokens}

    def finish(self) -> list[dict]:
        """Closes the last chunk (audio cut mid-segment: no end timestamp)."""
        if not self.previous_tokens:
            return []
        chunk = self._close(*self._resolve())
        self.previous_tokens, self.previous_times = [], []
        return [chunk]
