"""Tiny random causal-LM checkpoints and tokenizers for the text-generation tests.

GPT-2/OPT get a byte-level BPE tokenizer (GPT-2 style); the Llama family gets a metaspace
BPE with byte fallback (the Llama/Mistral tokenizer.json layout), whose decoder strips the
leading space and builds multi-byte characters from <0xNN> tokens: the hard cases for
incremental detokenization.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Pipelines serve models; models generate text one token at a time.",
    "Café, naïve, résumé: accents and emoji 🙂 test UTF-8 handling.",
    "Numbers 0123456789 and punctuation !?.,;: appear too.",
    "Streaming text must equal the final text, always.",
] * 4

VOCAB = 320
EOS = "<|endoftext|>"


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    trained.train_from_iterator(CORPUS, trainer)
    spec = json.loads(trained.to_str())["model"]
    # Llama's layout: specials, then the 256 <0xNN> byte tokens as ordinary vocabulary (so that
    # skip_special_tokens keeps them), then the learned pieces.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for piece in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sizes(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": None}


def build(family: str, directory: Path, **overrides):
    """Saves a tiny random `family` checkpoint + tokenizer to `directory`; returns (model, tokenizer)."""
    import transformers
    from harness import perturb_parameters

    torch.manual_seed(0)
    if family in ("gpt2", "opt"):
        tokenizer = byte_level_tokenizer()
    else:
        tokenizer = metaspace_tokenizer()
    ids = _sizes(tokenizer)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=overrides.pop("max_position_embeddings", 128))
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=ids["vocab_size"],
                                         bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], **overrides)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "opt":
        config = transformers.OPTConfig(ffn_dim=64, **small, **ids, **overrides)
        model = transformers.OPTForCausalLM(config)
    else:
        cls_config, cls_model = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        config = cls_config(intermediate_size=64, **{"num_key_value_heads": 2, **small, **ids, **overrides})
        model = cls_model(config)
    model.eval()
    # Random weights make a near-uniform next-token distribution; sharpen it so greedy and
    # sampled outputs are not decided by 1e-7 ties between our kernels and transformers'.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    perturb_parameters(model)  # biases and norm weights off 0 / 1, so dropping one fails parity
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model, tokenizer
