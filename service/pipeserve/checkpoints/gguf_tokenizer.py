"""A GGUF file's tokenizer (the `tokenizer.ggml.*` metadata) as a `tokenizers` tokenizer.json,
the same tokenizer transformers builds from the file (AutoTokenizer.from_pretrained(dir,
gguf_file=...)), and its tokenizer_config.json settings.

Served here: `tokenizer.ggml.model` "llama", SentencePiece-BPE with byte fallback, in two
spellings: Llama's (Metaspace pre-tokenizer, "▁" prepended to the first word) and Gemma's (spaces
become "▁" in a normalizer, text split after each space, no prefix). SentencePiece files carry
no merges: they are rebuilt from the vocabulary, each token cut into two tokens that exist,
best first (by score for Llama; by position in the file for Gemma, whose scores do not follow its
merge order). Tokens typed CONTROL, and the bos/eos/unk/pad tokens, are special added tokens;
USER_DEFINED ones are added tokens matched whole.

Ports transformers/integrations/gguf/gguf_tokenizer_mapping.py (sentencepiece_tokenizer,
gemma_tokenizer, get_merges, add_gguf_special_tokens), LlamaTokenizer/GemmaTokenizer's
backends and tokenization_utils_base.generate_merges.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from ..errors import ModelLoadFailed
from .gguf import GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's llama_token_type
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
_GEMMA_ARCHITECTURES = {"gemma", "gemma2", "gemma3"}


def _bad(path: Path, what: str) -> ModelLoadFailed:
    return ModelLoadFailed(f"{path.name}: tokenizer metadata {what}", reason="BAD_TOKENIZER")


def _token_list(gguf: GGUFFile) -> list[str]:
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadFailed(f"{gguf.path.name} has no tokenizer.ggml.tokens", reason="TOKENIZER_MISSING")
    return tokens


def special_tokens(gguf: GGUFFile) -> dict[str, str | None]:
    """bos/eos/unk/pad token strings from their ids (None where the file names none)."""
    tokens = _token_list(gguf)
    found: dict[str, str | None] = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = gguf.metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise _bad(gguf.path, f"{key} {token_id!r} is not a token id")
        found[name] = None if token_id is None else tokens[token_id]
    return found


def tokenizer_config(gguf: GGUFFile) -> dict[str, Any]:
    """What tokenizer_config.json would say: add_bos/eos_token, the special tokens, the chat
    template. llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise."""
    meta = gguf.metadata
    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **special_tokens(gguf),
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config


def _merges(tokens: list[str], vocab: dict[str, int], order: dict[str, float]) -> list[list[str]]:
    """tokenization_utils_base.generate_merges with scores: every split of a token into two
    tokens of the vocabulary, the best-scored token's splits first, shorter left pieces first
    on equal scores."""
    merges: list[tuple[str, str, float]] = []
    collecting = gc.isenabled()
    gc.disable()  # ~1M small tuples for a 262k vocabulary: the collector's passes doubled the time
    try:
        for token, score in order.items():
            local = [(token[:i], token[i:], score) for i in range(1, len(token))
                     if token[:i] in vocab and token[i:] in vocab]
            if len(local) > 1:
                local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
            merges.extend(local)
        merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
        return [[left, right] for left, right, _ in merges]
    finally:
        if collecting:
            gc.enable()


def _model(gguf: GGUFFile, tokens: list[str], gemma: bool) -> dict[str, Any]:
    meta = gguf.metadata
    if gemma:
        # runs of spaces are stored as spaces; the normalizer turns spaces into "▁"
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        pairs = [m.split(" ") for m in merges]
        if any(len(p) != 2 for p in pairs):
            raise _bad(gguf.path, "merges are not 'left right' pairs")
    elif gemma:
        pairs = _merges(tokens, vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise _bad(gguf.path, "has no merges and no score per token")
        pairs = _merges(tokens, vocab, dict(zip(tokens, scores)))
    return {"type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": pairs}


def _added_tokens(gguf: GGUFFile, tokens: list[str], specials: dict[str, str | None],
                  vocab: dict[str, int]) -> list[dict[str, Any]]:
    """CONTROL and named special tokens, then USER_DEFINED ones still spelled as in the
    vocabulary (Gemma's runs of spaces were respelled "▁▁...": transformers skips those)."""
    types = gguf.metadata.get("tokenizer.ggml.token_type") or []
    named = {t for t in specials.values() if t is not None}
    added = []
    for index, token in enumerate(tokens):
        kind = types[index] if index < len(types) else None
        if kind == CONTROL or token in named or (kind == USER_DEFINED and token in vocab):
            added.append({"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind != USER_DEFINED or token in named})
    return added


def _post_processor(config: dict[str, Any], vocab_ids: dict[str, int]) -> dict[str, Any] | None:
    """transformers' TokenizersBackend.update_post_processor: BOS before and EOS after each
    sequence, as add_bos_token / add_eos_token say."""
    bos, eos = config["bos_token"], config["eos_token"]
    use_bos, use_eos = config["add_bos_token"] and bos, config["add_eos_token"] and eos
    if not use_bos and not use_eos:
        return None

    def piece(type_id: int, sequence: str) -> list[dict[str, Any]]:
        parts = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if use_bos else []
        parts.append({"Sequence": {"id": sequence, "type_id": type_id}})
        if use_eos:
            parts.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        return parts

    specials = {t: {"id": t, "ids": [vocab_ids[t]], "tokens": [t]} for t in (bos if use_bos else None,
                                                                           eos if use_eos else None) if t}
    return {"type": "TemplateProcessing", "single": piece(0, "A"), "pair": piece(0, "A") + piece(1, "B"),
            "special_tokens": specials}


def tokenizer_json(gguf: GGUFFile) -> dict[str, Any]:
    """The tokenizer.json (as a dict) that the file's tokenizer metadata describes."""
    kind = gguf.metadata.get("tokenizer.ggml.model")
    if kind != "llama":
        raise ModelLoadFailed(f"{gguf.path.name}: tokenizer.ggml.model {str(kind)[:40]!r} is not served "
                              "(SentencePiece 'llama' is)", reason="BAD_TOKENIZER")
    tokens = _token_list(gguf)
    gemma = gguf.architecture in _GEMMA_ARCHITECTURES
    config = tokenizer_config(gguf)
    model = _model(gguf, tokens, gemma)
    if gemma:
        model["unk_token"] = config["unk_token"]
        normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        pre_tokenizer = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
        decoders = []
    else:
        normalizer = None
        prepend = "first" if gguf.metadata.get("tokenizer.ggml.add_space_prefix", True) else "never"
        pre_tokenizer = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend, "split": False}
        decoders = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prepend == "first" else []
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, *decoders]}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(gguf, tokens, special_tokens(gguf), model["vocab"]),
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "post_processor": _post_processor(config, model["vocab"]), "decoder": decoder, "model": model}
