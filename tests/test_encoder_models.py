"""Logit parity of the encoder families (bert, roberta, xlm-roberta, distilbert) and every
head against transformers on tiny random checkpoints, batched with right padding; and the
shared tokenizer (pipeserve.inputs.text) against transformers' fast tokenizer on the same files."""
from __future__ import annotations

import pytest
import torch

from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import assert_close

HEADS = ["base", "sequence_classification", "token_classification", "question_answering", "masked_lm"]
TEXTS = ["Sarah lives in Paris, doesn't she?", "Ünïcode wörds 3.14 end", "a"]
PAIRS = ["What is it?", "Where?", "b c"]


def _load(directory, head):
    import importlib

    from pipeserve.checkpoints.hub import resolve
    from pipeserve.pipelines.base import LoadOptions
    from pipeserve.checkpoints.registry import FAMILIES as REG

    files = resolve(str(directory))
    return importlib.import_module(REG[files.config["model_type"]]).load_model(files, LoadOptions(), head)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_head_logits_match_transformers_with_padding(tmp_path, family, head):
    directory, reference, tokenizer = build_checkpoint(family, head, tmp_path)
    ours = _load(directory, head)
    enc = tokenizer(TEXTS, PAIRS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        ref = reference(**enc)
        out = ours(enc["input_ids"], mask, enc.get("token_type_ids"))
    keep = mask.bool()
    if head == "base":
        assert_close(out[0][keep], ref.last_hidden_state[keep])
        if out[1] is not None:
            assert_close(out[1], ref.pooler_output)
    elif head == "question_answering":
        assert_close(out[0][keep], ref.start_logits[keep])
        assert_close(out[1][keep], ref.end_logits[keep])
    elif head == "sequence_classification":
        assert_close(out, ref.logits)
    else:
        assert_close(out[keep], ref.logits[keep])
    # Each row of the padded batch equals that row run alone (padding changes nothing).
    with torch.no_grad():
        single = ours(enc["input_ids"][2:3, : int(mask[2].sum())], mask[2:3, : int(mask[2].sum())],
                      None if enc.get("token_type_ids") is None else enc["token_type_ids"][2:3, : int(mask[2].sum())])
    first = lambda o: o[0] if isinstance(o, tuple) else o
    batched_row = first(out)[2:3]
    if batched_row.dim() >= 2 and head != "sequence_classification":
        batched_row = batched_row[:, : int(mask[2].sum())]
    assert_close(first(single), batched_row)


def test_masked_lm_decoder_shares_the_word_embeddings(tmp_path):
    directory, _, _ = build_checkpoint("bert", "masked_lm", tmp_path)
    model = _load(directory, "masked_lm")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_base_head_loads_from_a_task_checkpoint(tmp_path):
    """Feature extraction on a classifier checkpoint uses its encoder, as AutoModel does."""
    import transformers as T

    directory, reference, tokenizer = build_checkpoint("roberta", "sequence_classification", tmp_path)
    ours = _load(directory, "base")
    base = T.AutoModel.from_pretrained(directory).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_close(ours(enc["input_ids"], enc["attention_mask"])[0][enc["attention_mask"].bool()],
                     base(**enc).last_hidden_state[enc["attention_mask"].bool()])


def test_unknown_head_is_a_load_error(tmp_path):
    from pipeserve.errors import ModelLoadFailed

    directory, _, _ = build_checkpoint("distilbert", "base", tmp_path)
    with pytest.raises(ModelLoadFailed, match="no 'ctc' head"):
        _load(directory, "ctc")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_transformers(tmp_path, family):
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.inputs.text import TextTokenizer

    directory, _, reference = build_checkpoint(family, "base", tmp_path)
    ours = TextTokenizer.from_files(resolve(str(directory)))
    assert ours.model_max_length == reference.model_max_length
    assert ours.pad_token_id == reference.pad_token_id
    texts = TEXTS + [f"fill {reference.mask_token} here"]
    ref = reference(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    rows = ours.encode(texts)
    for i, row in enumerate(rows):
        assert row.ids == ref["input_ids"][i]
        assert row.offsets == [tuple(o) for o in ref["offset_mapping"][i]]
        assert row.special_mask == ref["special_tokens_mask"][i]
        assert ours.decode(row.ids, skip_special_tokens=True) == reference.decode(ref["input_ids"][i], skip_special_tokens=True)
    # Question/context windows with stride, as the QA pipeline tokenizes them.
    ref = reference(PAIRS, TEXTS, truncation="only_second", max_length=22, stride=3, return_overflowing_tokens=True)
    rows = ours.encode(PAIRS, TEXTS, truncation="only_second", max_length=22, stride=3, overflow=True)
    assert [r.ids for r in rows] == ref["input_ids"]
    assert [r.source for r in rows] == ref["overflow_to_sample_mapping"]
    batch = ours.pad(rows)
    assert (batch.token_type_ids is not None) == ("token_type_ids" in ref)
    if batch.token_type_ids is not None:
        padded = reference.pad({"input_ids": ref["input_ids"], "token_type_ids": ref["token_type_ids"]},
                               return_tensors="pt")
        assert torch.equal(batch.token_type_ids, padded["token_type_ids"])


def test_stride_that_does_not_fit_is_invalid_input(tmp_path):
    from pipeserve.errors import InvalidInput
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.inputs.text import TextTokenizer

    directory, _, _ = build_checkpoint("bert", "base", tmp_path)
    ours = TextTokenizer.from_files(resolve(str(directory)))
    with pytest.raises(InvalidInput, match="stride"):
        ours.encode(["a much longer question than the window allows"], ["context words here"],
                    truncation="only_second", max_length=14, stride=5, overflow=True)


def test_pretokenized_words_match_transformers(tmp_path):
    """is_split_into_words encoding (used by document QA): ids, word ids and overflow windows."""
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.inputs.text import TextTokenizer

    directory, _, reference = build_checkpoint("bert", "base", tmp_path)
    ours = TextTokenizer.from_files(resolve(str(directory)))
    question, words = ["what", "is", "it?"], "Sarah lives in Paris and works in New York City".split()
    ref = reference([question], [words], is_split_into_words=True, truncation="only_second", max_length=12,
                    stride=2, return_overflowing_tokens=True)
    rows = ours.encode([question], [words], pretokenized=True, truncation="only_second", max_length=12, stride=2,
                       overflow=True)
    assert [r.ids for r in rows] == ref["input_ids"]
    assert [r.word_ids for r in rows] == [ref.word_ids(i) for i in range(len(rows))]


# The config fields each encoder family honours beyond sizes, one parity case each, set to a
# value that changes transformers' output against the family's base config (asserted).
# DistilBERT's sinusoidal_pos_embds stores its table in the checkpoint, which we must read.
# (gelu_new is not here: on these activations it is within 1e-4 of gelu, caught by the check.)
CONFIG_VARIANTS = {
    "bert-hidden_act-relu": ("bert", {"hidden_act": "relu"}),
    "bert-layer_norm_eps": ("bert", {"layer_norm_eps": 1e-1}),
    "roberta-layer_norm_eps": ("roberta", {"layer_norm_eps": 1e-1}),
    "xlm-roberta-hidden_act-silu": ("xlm-roberta", {"hidden_act": "silu"}),
    "distilbert-activation-relu": ("distilbert", {"activation": "relu"}),
    "distilbert-sinusoidal_pos_embds": ("distilbert", {"sinusoidal_pos_embds": True}),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_config_variant_matches_transformers(tmp_path, variant):
    from harness import PARITY_ATOL

    family, overrides = CONFIG_VARIANTS[variant]
    _, base, tokenizer = build_checkpoint(family, "base", tmp_path / "base")
    directory, reference, _ = build_checkpoint(family, "base", tmp_path / "variant", **overrides)
    for key, value in overrides.items():
        assert getattr(reference.config, key) == value, key
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**enc).last_hidden_state
        assert (expected - base(**enc).last_hidden_state)[keep].abs().max() > 100 * PARITY_ATOL, \
            f"{variant} does not change transformers' output: the case tests nothing"
        out = _load(directory, "base")(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    assert_close(out[0][keep], expected[keep])
