"""GGUF metadata and tensor names -> a transformers config and transformers' tensor names, per
GGUF architecture (`general.architecture`).

llama.cpp names the config `<arch>.<key>` (llama.embedding_length, gemma3.attention.sliding_window,
...) and the tensors `token_embd`, `blk.N.attn_q`, ...; its converter also reshapes a few
tensors, which are undone here so that the result equals the Hugging Face checkpoint it came
from:

* Llama: q and k rows permuted for llama.cpp's rotary layout (convert_hf_to_gguf.py
  LlamaModel.permute: rows (head, half, pair) -> (head, pair, half)), undone per head.
* Gemma: RMSNorm weights stored as (1 + weight), as the model multiplies by them
  (convert_hf_to_gguf.py Gemma3Model.modify_tensors adds 1), so 1 is subtracted.

Ports the mapping of transformers/integrations/ggml.py (GGUF_CONFIG_MAPPING) and
transformers/modeling_gguf_pytorch_utils.py (LlamaTensorProcessor, Gemma2TensorProcessor).
"""
from __future__ import annotations

import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ModelLoadFailed
from .gguf import GGUFFile

# blk.N.<gguf name> -> model.layers.N.<transformers name>, per architecture group
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp writes these for its own kernels; transformers computes them from the config
_SKIPPED = {"rope_freqs.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one GGUF architecture becomes a transformers checkpoint."""

    config: Callable[[GGUFFile], dict[str, Any]]
    layer_names: dict[str, str]
    fix: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor]


def _key(gguf: GGUFFile, arch: str, name: str, default: Any = ...) -> Any:
    value = gguf.metadata.get(f"{arch}.{name}", default)
    if value is ...:
        raise ModelLoadFailed(f"{gguf.path.name}: metadata {arch}.{name} is missing", reason="GGUF_METADATA_MISMATCH")
    return value


def _positive_int(value: Any, gguf: GGUFFile, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadFailed(f"{gguf.path.name}: {what} is {value!r}, not a positive integer",
                              reason="GGUF_METADATA_MISMATCH")
    return value


def _common_config(gguf: GGUFFile, arch: str) -> dict[str, Any]:
    """The keys llama.cpp writes for every decoder-only family, under transformers' names."""
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "max_position_embeddings": _key(gguf, arch, "context_length"),
        "hidden_size": _key(gguf, arch, "embedding_length"),
        "num_hidden_layers": _key(gguf, arch, "block_count"),
        "intermediate_size": _key(gguf, arch, "feed_forward_length"),
        "num_attention_heads": _key(gguf, arch, "attention.head_count"),
        "rms_norm_eps": _key(gguf, arch, "attention.layer_norm_rms_epsilon"),
        "vocab_size": _key(gguf, arch, "vocab_size", len(tokens) if isinstance(tokens, list) else None),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf.metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gguf.metadata.get("tokenizer.ggml.padding_token_id"),
    }
    config["num_key_value_heads"] = _key(gguf, arch, "attention.head_count_kv", config["num_attention_heads"])
    for name in ("max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "vocab_size"):
        _positive_int(config[name], gguf, name)
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ModelLoadFailed(f"{gguf.path.name}: {config['num_attention_heads']} attention heads are not a multiple "
                              f"of {config['num_key_value_heads']} kv heads", reason="GGUF_METADATA_MISMATCH")
    rope_theta = gguf.metadata.get(f"{arch}.rope.freq_base")
    if rope_theta is not None:
        config["rope_theta"] = float(rope_theta)
    return config


def _llama_config(gguf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gguf, "llama")
    # head_dim: llama.cpp states it as the key length, or (older files) as the rotary width
    head_dim = gguf.metadata.get("llama.attention.key_length", gguf.metadata.get("llama.rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = _positive_int(head_dim, gguf, "llama.attention.key_length")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **config}


def _gemma3_config(gguf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gguf, "gemma3")
    config["head_dim"] = _positive_int(_key(gguf, "gemma3", "attention.key_length"), gguf,
                                       "gemma3.attention.key_length")
    window = gguf.metadata.get("gemma3.attention.sliding_window")
    if window is not None:
        config["sliding_window"] = _positive_int(window, gguf, "gemma3.attention.sliding_window")
    return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **config}


def _unpermute_rows(weight: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """Undoes convert_hf_to_gguf.py LlamaModel.permute: per head, llama.cpp stores the rows of
    the two rotary halves interleaved (pair-major); transformers keeps them half-major."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ModelLoadFailed(f"tensor {name}: {rows} rows do not split into {heads} heads of rotary pairs",
                              reason="GGUF_METADATA_MISMATCH")
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_fix(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    if ".attn_q." in name:
        return _unpermute_rows(tensor, config["num_attention_heads"], name)
    if ".attn_k." in name:
        return _unpermute_rows(tensor, config["num_key_value_heads"], name)
    return tensor


def _gemma_fix(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    return tensor - 1 if name.endswith("norm.weight") else tensor


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(_llama_config, _LLAMA_LAYER, _llama_fix),
    "gemma3": GGUFArchitecture(_gemma3_config, _GEMMA3_LAYER, _gemma_fix),
}


def architecture_of(gguf: GGUFFile) -> GGUFArchitecture:
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise ModelLoadFailed(f"{gguf.path.name} holds a GGUF {arch[:80]!r} model; GGUF architectures served: "
                              f"{', '.join(sorted(ARCHITECTURES))}", reason="UNSUPPORTED_FAMILY")
    return ARCHITECTURES[arch]


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json transformers would build from this file's metadata, checked against the
    file's tensor table (before any tensor is read)."""
    config = architecture_of(gguf).config(gguf)
    check_tensor_shapes(gguf, config)
    return config


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF name (per layer without the blk.N. prefix) -> the shape the metadata implies."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {
        "token_embd.weight": (config["vocab_size"], hidden), "output.weight": (config["vocab_size"], hidden),
        "output_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden), "attn_k.weight": (kv_rows, hidden), "attn_v.weight": (kv_rows, hidden),
        "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
        "attn_output.weight": (hidden, q_rows), "ffn_gate.weight": (inner, hidden), "ffn_up.weight": (inner, hidden),
        "ffn_down.weight": (hidden, inner), "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,),
        **{f"{norm}.weight": (hidden,) for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")},
    }


def check_tensor_shapes(gguf: GGUFFile, config: dict[str, Any]) -> None:
    """Every tensor has the shape the metadata implies, and there is one block of tensors per
    layer the metadata counts: a file whose header disagrees with its tensors is refused here,
    by name, rather than failing somewhere inside the model."""
    expected = _expected_shapes(config)
    layers = set()
    for name, info in gguf.tensors.items():
        match = _LAYER_NAME.fullmatch(name)
        if match:
            layers.add(int(match.group(1)))
        key = f"{match.group(2)}.{match.group(3)}" if match else name
        want = expected.get(key)
        if want is not None and info.shape != want:
            raise ModelLoadFailed(f"{gguf.path.name}: tensor {name} has shape {list(info.shape)}, but the metadata "
                                  f"implies {list(want)}", reason="GGUF_METADATA_MISMATCH")
    count = config["num_hidden_layers"]
    if len(layers) != count or (layers and (min(layers) != 0 or max(layers) != count - 1)):
        raise ModelLoadFailed(f"{gguf.path.name}: the metadata counts {config['num_hidden_layers']} blocks, the "
                              f"tensors hold {len(layers)} (blk.{min(layers, default=0)}..{max(layers, default=-1)})",
                              reason="GGUF_METADATA_MISMATCH")


def transformers_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight; None for tensors transformers does not keep."""
    if gguf_name in _SKIPPED:
        return None
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in layer_names:
            raise ModelLoadFailed(f"tensor {gguf_name[:80]} is not part of this architecture", reason="WEIGHTS_MISMATCH")
        return f"model.layers.{layer}.{layer_names[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP and kind in ("weight", "bias"):
        return f"{_TOP[base]}.{kind}"
    raise ModelLoadFailed(f"tensor {gguf_name[:80]} is not part of this architecture", reason="WEIGHTS_MISMATCH")


class GGUFState(MutableMapping):
    """The checkpoint's tensors by transformers' name, each dequantized, renamed and fixed when
    it is read and not kept: the loader copies tensor by tensor into the module
    (weights.assign), so loading holds the model plus one float tensor, never the whole file
    dequantized beside it. A family's `prepare` may still set or delete names (kept apart)."""

    def __init__(self, gguf: GGUFFile, config: dict[str, Any], dtype: torch.dtype, device: torch.device | str):
        self._gguf, self._config, self._dtype, self._device = gguf, config, dtype, device
        self._arch = architecture_of(gguf)
        self._sources: dict[str, str] = {}  # transformers name -> GGUF name
        for name in gguf.tensors:
            target = transformers_name(name, self._arch.layer_names)
            if target is not None:
                self._sources[target] = name
        self._overrides: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._overrides:
            return self._overrides[key]
        name = self._sources[key]
        tensor = self._arch.fix(name, self._gguf.read(name), self._config)
        return tensor.to(device=self._device, dtype=self._dtype if tensor.is_floating_point() else tensor.dtype)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._overrides[key] = value

    def __delitem__(self, key: str) -> None:
        found = self._overrides.pop(key, None) is not None
        if self._sources.pop(key, None) is None and not found:
            raise KeyError(key)

    def __iter__(self):
        yield from self._sources
        yield from (key for key in self._overrides if key not in self._sources)

    def __len__(self) -> int:
        return len(self._sources.keys() | self._overrides.keys())


def read_gguf_state(gguf: GGUFFile, config: dict[str, Any], dtype: torch.dtype,
                    device: torch.device | str) -> GGUFState:
    """Every tensor dequantized, renamed and un-permuted, in `dtype` on `device`, read lazily."""
    return GGUFState(gguf, config, dtype, device)
