"""Tiny random encoder checkpoints (bert, roberta, xlm-roberta, distilbert) with real
tokenizer.json files, for the encoder parity tests. Tokenizers are trained on a few
sentences with the `tokenizers` library, wrapped in transformers' PreTrainedTokenizerFast and
saved with save_pretrained, so the oracle and pipeserve read the same files.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "My name is Wolfgang and I live in Berlin.",
    "Sarah works at Acme Corporation in New York City!",
    "The quick brown fox jumps over the lazy dog, doesn't it?",
    "Hugging Face is a company based in Paris and New York.",
    "Question answering finds the answer span in a context paragraph.",
    "What is the capital of France? Paris is the capital of France.",
    "Transformers are neural networks; encoders read whole sentences at once.",
    "Ünïcode wörds, émojis and numbers like 1234 or 3.14 appear too.",
]

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=180, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _byte_bpe():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                     sep_token="</s>", mask_token="<mask>")


def _unigram():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                     sep_token="</s>", mask_token="<mask>")


def build_tokenizer(family: str, model_max_length: int = 40):
    from transformers import PreTrainedTokenizerFast

    backend, specials = {"bert": _wordpiece, "distilbert": _wordpiece, "roberta": _byte_bpe,
                         "xlm-roberta": _unigram}[family]()
    input_names = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                   model_input_names=input_names, **specials)


def build_config(family: str, tokenizer, num_labels: int = 3, **extra):
    import transformers as T

    vocab = len(tokenizer)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                  max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                  num_labels=num_labels, **extra)
    cls = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig}[family]
    roberta = family != "bert"
    return cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
               max_position_embeddings=64 + (2 if roberta else 0), type_vocab_size=1 if roberta else 2,
               pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
               bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **extra)


_HEAD_CLASSES = {
    "base": "Model", "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification", "question_answering": "ForQuestionAnswering",
    "masked_lm": "ForMaskedLM",
}
_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert"}


def build_checkpoint(family: str, head: str, directory: Path, *, seed: int = 0, model_max_length: int = 40,
                     **config_extra) -> tuple[Path, object, object]:
    """Saves a tiny random `family` model with `head` and its tokenizer; returns (dir, model, tokenizer)."""
    import transformers as T
    from harness import save_checkpoint

    tokenizer = build_tokenizer(family, model_max_length)
    if head == "token_classification":
        config_extra.setdefault("id2label", dict(enumerate(NER_LABELS)))
        config_extra.setdefault("label2id", {l: i for i, l in enumerate(NER_LABELS)})
        num_labels = len(NER_LABELS)
    elif head == "question_answering":
        num_labels = 2
    else:
        num_labels = config_extra.pop("num_labels", 3)
    config = build_config(family, tokenizer, num_labels=num_labels, **config_extra)
    torch.manual_seed(seed)
    model = getattr(T, _PREFIX[family] + _HEAD_CLASSES[head])(config).eval()
    # Random init gives near-uniform predictions; sharper logits make labels and spans decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)
    save_checkpoint(model, directory, tokenizer)
    return directory, model, tokenizer
