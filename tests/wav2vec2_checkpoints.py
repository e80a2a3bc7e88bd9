"""Tiny random Wav2Vec2 / HuBERT CTC checkpoints with a character vocabulary, saved as
transformers saves them (config.json, model.safetensors, vocab.json, tokenizer_config.json,
preprocessor_config.json), for the wav2vec2 parity tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Letters plus the apostrophe, after the four specials and the word delimiter, as in
# facebook/wav2vec2-base-960h's vocab.json.
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
         **{c: 5 + i for i, c in enumerate("ETAOINSHRDLUMWYFCGBPKVJXQZ")}, "'": 31}

TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, conv_dim=(32, 32, 32), conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0)

VARIANTS = {
    # facebook/wav2vec2-base-960h style: group-norm feature encoder, post-norm encoder.
    "base": ("wav2vec2", dict(feat_extract_norm="group", do_stable_layer_norm=False), False),
    # wav2vec2-large-960h-lv60-self style: layer-norm feature encoder, stable layer norm.
    "large": ("wav2vec2", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True), True),
    # facebook/hubert-large-ls960-ft style.
    "hubert": ("hubert", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True), True),
    # HuBERT base style (group norm, no stable layer norm), without the projection's layer norm.
    "hubert_base": ("hubert", dict(feat_extract_norm="group", do_stable_layer_norm=False,
                                   feat_proj_layer_norm=False), False),
    # HuBERT with a batch-norm positional embedding instead of weight norm (conv_pos_batch_norm).
    "hubert_bn": ("hubert", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_pos_batch_norm=True), True),
}


def build(variant: str, directory: Path, seed: int = 0, legacy_weight_norm: bool = False):
    """Saves a tiny random checkpoint + processor; returns (directory, transformers model)."""
    from transformers import (HubertConfig, HubertForCTC, Wav2Vec2Config, Wav2Vec2CTCTokenizer,
                              Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor)
    from harness import perturb_parameters

    family, extra, attention_mask = VARIANTS[variant]
    torch.manual_seed(seed)
    if family == "hubert":
        model = HubertForCTC(HubertConfig(**TINY, **extra))
    else:
        model = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY, **extra))
    perturb_parameters(model, seed)  # norm weights and biases off 1 / 0, so dropping one fails parity
    with torch.no_grad():
        # Random heads emit one letter everywhere; a wide head and a bias towards blank and
        # the word delimiter make varied text with words and repeated frames.
        model.lm_head.weight.normal_(0, 2.0)
        # The head reads the last LayerNorm's output, whose (perturbed) bias would add one fixed
        # offset to every frame's logits and make one letter win everywhere: cancel it in the
        # head's bias (both stay non-zero, so a family that dropped either still fails parity).
        encoder = model.base_model.encoder
        last_norm = encoder.layer_norm if extra["do_stable_layer_norm"] else encoder.layers[-1].final_layer_norm
        model.lm_head.bias.copy_(-model.lm_head.weight @ last_norm.bias + 0.1 * torch.randn(len(VOCAB)))
        model.lm_head.bias[0] += 3.0
        model.lm_head.bias[4] += 2.5
        for module in model.modules():  # non-trivial running statistics for batch norms
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(VOCAB))
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"))
    feature_extractor = Wav2Vec2FeatureExtractor(return_attention_mask=attention_mask, do_normalize=True)
    model.save_pretrained(directory, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)
    if legacy_weight_norm:
        _rename_weight_norm(directory)
    return directory, model


def _rename_weight_norm(directory: Path) -> None:
    """Rewrites the checkpoint with the old weight_g / weight_v names (torch.nn.utils.weight_norm)."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def audio(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Speech-like test audio: a few chirps with an envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = np.zeros(n)
    for k in range(4):
        f0 = rng.uniform(100, 900)
        x += np.sin(2 * np.pi * (f0 * t + rng.uniform(50, 400) * t * t)) * rng.uniform(0.2, 1.0)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3.0) * t)
    x = x * envelope + 0.05 * rng.standard_normal(n)
    return (0.3 * x / max(1e-9, np.abs(x).max())).astype(np.float32)
