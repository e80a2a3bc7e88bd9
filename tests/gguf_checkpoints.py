"""Tiny random checkpoints written as GGUF files with the `gguf` package's writer, the way
llama.cpp's convert_hf_to_gguf.py writes them: metadata under `<arch>.` keys, the tokenizer as
`tokenizer.ggml.*` arrays (no merges for a SentencePiece vocabulary: scores order them), tensors
under llama.cpp's names, Llama's q/k rows permuted for llama.cpp's rotary layout, norms in F32
and the matrices in the requested type (F32 or a quantized one such as Q8_0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

_LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_LAYERS = {"llama": _LLAMA_LAYER, "gemma3": _GEMMA3_LAYER}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: per head, the rows of the two rotary halves
    interleaved pair by pair."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_LAYERS[arch][rest]}.{kind}"
    return f"{_TOP[base]}.{kind}"


def _token_type(token: str, special: set[str], unknown: str) -> int:
    if token == unknown:
        return UNKNOWN
    if token in special:
        return CONTROL
    if token.startswith("<0x") and len(token) == 6 and token.endswith(">"):
        return BYTE
    return NORMAL


def add_sentencepiece_tokenizer(writer, tokens: list[str], *, bos: str, eos: str, unk: str, pad: str | None = None,
                                special: set[str] = frozenset(), add_bos: bool = True) -> None:
    """tokenizer.ggml.* for a SentencePiece-BPE vocabulary (llama.cpp's "llama" model): tokens
    in id order, scores (earlier pieces merge first; llama.cpp writes 0 for the others), types."""
    special = {bos, eos, unk, *([pad] if pad else []), *special}
    types = [_token_type(t, special, unk) for t in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) if kind == NORMAL else 0.0 for i, kind in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index(bos))
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_unk_token_id(tokens.index(unk))
    if pad is not None:
        writer.add_pad_token_id(tokens.index(pad))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)


def tokens_of(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]


def _add_tensors(writer, state: dict[str, torch.Tensor], arch: str, quant, fix) -> None:
    import gguf

    for name, tensor in state.items():
        if "rotary_emb" in name:
            continue
        array = fix(name, tensor.detach().float().numpy())
        if array.ndim == 2 and quant is not gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name, arch), gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name, arch), np.ascontiguousarray(array, dtype=np.float32))


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _state(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp writes output.weight only when untied
    return state


def write_llama(model, tokenizer, path: Path, qtype: str = "F32", chat_template: str | None = None) -> Path:
    """`model` (a transformers LlamaForCausalLM) and its tokenizer as a GGUF file at `path`
    (with `tokenizer.chat_template` when given)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_sentencepiece_tokenizer(writer, tokens_of(tokenizer), bos="<s>", eos="</s>", unk="<unk>")
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def permute(name: str, array: np.ndarray) -> np.ndarray:
        if name.endswith("q_proj.weight"):
            return llama_cpp_permute(array, config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return llama_cpp_permute(array, config.num_key_value_heads)
        return array

    _add_tensors(writer, _state(model), "llama", gguf.GGMLQuantizationType[qtype], permute)
    _finish(writer)
    return path


def write_gemma3(model, tokens: list[str], path: Path, qtype: str = "F32") -> Path:
    """`model` (a transformers Gemma3ForCausalLM) as llama.cpp's Gemma3Model converter writes it:
    RMSNorm weights stored as 1 + weight, the output projection tied (not written)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["full_attention"]["rope_theta"]))
    writer.add_sliding_window(config.sliding_window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    add_sentencepiece_tokenizer(writer, tokens, bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>",
                                special={"<mask>"})

    def one_plus(name: str, array: np.ndarray) -> np.ndarray:
        return array + 1 if name.endswith("norm.weight") else array

    _add_tensors(writer, _state(model), "gemma3", gguf.GGMLQuantizationType[qtype], one_plus)
    _finish(writer)
    return path


# What transformers (and llama.cpp) assume for a Gemma 3 GGUF, which states none of these: a
# global layer every 6th, query_pre_attn_scalar 256, local RoPE base 10000, no RoPE scaling.
# 7 layers hold both kinds (layer 5 is global) and a window of 4 is passed by the prompts.
GEMMA3_GGUF_SHAPE = dict(num_hidden_layers=7, sliding_window_pattern=6, query_pre_attn_scalar=256,
                         rope_local_base_freq=10000.0, rope_scaling=None, sliding_window=4)


# Gemma's vocabulary starts with these (the real 262k one too): GemmaTokenizer expects them.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def build_gemma3_gguf(directory: Path, qtype: str = "F32"):
    """A tiny random Gemma 3 (generation_checkpoints.build) written as `directory`/gguf/tiny-gemma3-<qtype>.gguf,
    with the tiny metaspace vocabulary laid out as Gemma's (its specials first). Returns (gguf path,
    the transformers model it was written from)."""
    from generation_checkpoints import build, metaspace_tokenizer

    tokens = GEMMA_SPECIALS + [t for t in tokens_of(metaspace_tokenizer()) if t not in ("<unk>", "<s>", "</s>")]
    torch.manual_seed(0)
    model, _ = build("gemma3", directory / "hf", **GEMMA3_GGUF_SHAPE, vocab_size=len(tokens), pad_token_id=0,
                     eos_token_id=1, bos_token_id=2)
    target = directory / "gguf"
    target.mkdir(parents=True, exist_ok=True)
    return write_gemma3(model, tokens, target / f"tiny-gemma3-{qtype.lower()}.gguf", qtype), model


def build_llama_gguf(directory: Path, qtype: str = "F32", chat_template: str | None = None, **overrides):
    """A tiny random Llama (generation_checkpoints.build) written as `directory`/gguf/tiny-<qtype>.gguf,
    alone in its directory. Returns (gguf path, the transformers model it was written from)."""
    from generation_checkpoints import build

    torch.manual_seed(0)
    model, tokenizer = build("llama", directory / "hf", **overrides)
    target = directory / "gguf"
    target.mkdir(parents=True, exist_ok=True)
    return write_llama(model, tokenizer, target / f"tiny-{qtype.lower()}.gguf", qtype, chat_template), model
