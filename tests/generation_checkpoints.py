"""Tiny random causal-LM checkpoints and tokenizers for the text-generation tests.

GPT-2/OPT get a byte-level BPE tokenizer (GPT-2 style); the Llama family gets a metaspace
BPE with byte fallback (the Llama/Mistral tokenizer.json layout), whose decoder strips the
leading space and builds multi-byte characters from <0xNN> tokens: the hard cases for
incremental detokenization. Gemma 3 uses the metaspace tokenizer too.

With `special_tokens=True` each tokenizer gets its family's tokenizer.json post-processor, which
decides what tokenizing a prompt adds: Llama and Gemma put their BOS first (TemplateProcessing),
OPT its BOS (here the one special token), GPT-2 nothing (ByteLevel). Without it there is no
post-processor and nothing is added.
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


def _bos_template(bos: str, bos_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def byte_level_tokenizer(post_processor: str | None = None):
    """post_processor: None, "bos" (OPT's template) or "byte_level" (GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor == "bos":
        tok.post_processor = _bos_template(EOS, tok.token_to_id(EOS))
    elif post_processor == "byte_level":
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def metaspace_tokenizer(bos_template: bool = False):
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
    if bos_template:
        tok.post_processor = _bos_template("<s>", vocab["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sizes(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": None}


# Gemma 3's parity shape: 5 layers, local (sliding window 4) and global interleaved with the
# pattern 3 (layers 0, 1, 3, 4 local; 2 global), one KV head, a query_pre_attn_scalar unlike
# head_dim, two RoPE bases and linear scaling on the global layers.
GEMMA3_SMALL = dict(intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=8, sliding_window=4, sliding_window_pattern=3, query_pre_attn_scalar=12,
                    rope_theta=1000.0, rope_local_base_freq=50.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0})


def build(family: str, directory: Path, special_tokens: bool = False, **overrides):
    """Saves a tiny random `family` checkpoint + tokenizer to `directory`; returns (model, tokenizer).
    special_tokens: the tokenizer gets the family's post-processor (module docstring)."""
    import transformers
    from harness import perturb_parameters

    torch.manual_seed(0)
    if family in ("gpt2", "opt"):
        post_processor = {"gpt2": "byte_level", "opt": "bos"}[family] if special_tokens else None
        tokenizer = byte_level_tokenizer(post_processor)
    else:
        tokenizer = metaspace_tokenizer(bos_template=special_tokens)
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
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(hidden_size=32, max_position_embeddings=small["max_position_embeddings"],
                                               **{**GEMMA3_SMALL, **ids, **overrides})
        model = transformers.Gemma3ForCausalLM(config)
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
