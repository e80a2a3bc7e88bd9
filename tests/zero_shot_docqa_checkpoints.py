"""Tiny random checkpoints for the zero-shot and document-QA tests: a BART NLI classifier with a
byte-level BPE tokenizer, BERT-family NLI heads (from encoder_checkpoints), a LayoutLM QA model
with a WordPiece tokenizer, and a rendered invoice page. Tokenizers are trained with the
`tokenizers` library and saved through transformers so the oracle and pipeserve read the same
files."""
from __future__ import annotations

from pathlib import Path

import torch

NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "This example is sports. This example is politics. This example is cooking.",
    "I love playing football on weekends with my friends!",
    "The election results were announced today in the capital.",
    "Invoice number: 12345 Date: 2024-03-01 Total: $99.00 ACME Corporation",
    "What is the invoice number? What is the total amount due?",
]
INVOICE_LINES = ["ACME Corporation", "Invoice number: 12345", "Date: 2024-03-01", "Total: $99.00"]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _sharpen(model) -> None:
    # Random init gives near-uniform outputs; larger weights make rankings decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)


def _save_sharpened(model_class, config, tokenizer, directory: Path, seed: int) -> Path:
    """A seeded random model_class(config), sharpened and perturbed, saved with its tokenizer."""
    from harness import save_checkpoint

    torch.manual_seed(seed)
    model = model_class(config).eval()
    _sharpen(model)
    save_checkpoint(model, directory)  # perturbs biases and norm weights, refuses constant tensors
    tokenizer.save_pretrained(directory)
    return directory


def build_bart_nli(directory: Path, *, model_max_length: int = 48, seed: int = 0,
                   label2id: dict[str, int] | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, BartForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"])
    label2id = label2id or {v: k for k, v in NLI_LABELS.items()}
    config = BartConfig(vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                        decoder_ffn_dim=37, max_position_embeddings=64,
                        id2label={i: l for l, i in label2id.items()}, label2id=label2id)
    return _save_sharpened(BartForSequenceClassification, config, tokenizer, directory, seed)


def build_encoder_nli(family: str, directory: Path, *, seed: int = 0) -> Path:
    """A BERT / RoBERTa / DistilBERT NLI head from the encoder engineer's builders."""
    from encoder_checkpoints import build_checkpoint

    build_checkpoint(family, "sequence_classification", directory, seed=seed, num_labels=3,
                     id2label=dict(NLI_LABELS), label2id={v: k for k, v in NLI_LABELS.items()})
    return directory


def build_layoutlm_qa(directory: Path, *, model_max_length: int = 64, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LayoutLMConfig, LayoutLMForQuestionAnswering, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]", model_max_length=model_max_length)
    config = LayoutLMConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=37, max_position_embeddings=model_max_length,
                            max_2d_position_embeddings=1024)
    return _save_sharpened(LayoutLMForQuestionAnswering, config, tokenizer, directory, seed)


def render_invoice(lines: list[str] = INVOICE_LINES, size: tuple[int, int] = (800, 400), font_size: int = 36):
    """A clean page of large text (PIL image) that Tesseract reads reliably."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, font_size)
    for i, line in enumerate(lines):
        draw.text((40, 30 + i * 80), line, fill="black", font=font)
    return image


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
