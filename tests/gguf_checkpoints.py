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
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: per head, the rows of the two rotary halves
    interleaved pair by pair."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_LLAMA_LAYER[rest]}.{kind}"
    return f"{_TOP[base]}.{kind}"


def _token_type(token: str, special: set[str]) -> int:
    if token == "<unk>":
        return UNKNOWN
    if token in special:
        return CONTROL
    if token.startswith("<0x") and len(token) == 6 and token.endswith(">"):
        return BYTE
    return NORMAL


def add_sentencepiece_tokenizer(writer, tokenizer, *, add_bos: bool = True) -> None:
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    types = [_token_type(t, special) for t in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    # SentencePiece scores: earlier pieces merge first; llama.cpp writes 0 for the others
    writer.add_token_scores([-float(i) if kind == NORMAL else 0.0 for i, kind in enumerate(types)])
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)


def write_llama(model, tokenizer, path: Path, qtype: str = "F32", *, metadata_overrides=None) -> Path:
    """`model` (a transformers LlamaForCausalLM) and its tokenizer as a GGUF file at `path`."""
    import gguf

    config = model.config
    quant = gguf.GGMLQuantizationType[qtype]
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
    for key, value in (metadata_overrides or {}).items():
        writer.add_uint32(key, value)
    add_sentencepiece_tokenizer(writer, tokenizer)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        if "rotary_emb" in name:
            continue
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 2 and quant is not gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_llama_gguf(directory: Path, qtype: str = "F32", **overrides):
    """A tiny random Llama (generation_checkpoints.build) written as `directory`/tiny-<qtype>.gguf,
    alone in its directory. Returns (gguf path, the transformers model it was written from)."""
    from generation_checkpoints import build

    torch.manual_seed(0)
    model, tokenizer = build("llama", directory / "hf", **overrides)
    target = directory / "gguf"
    target.mkdir(parents=True, exist_ok=True)
    return write_llama(model, tokenizer, target / f"tiny-{qtype.lower()}.gguf", qtype), model
