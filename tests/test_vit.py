"""ViT family parity: our modules against transformers' on tiny random checkpoints.

Logits (classification head) and last hidden states (base model) within 1e-4 in float32, with
and without position-embedding interpolation; loading refuses mismatched checkpoints.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness import assert_close, assert_close_in_precision, load_pipeline, save_checkpoint

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8)


def _processor(**kwargs):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    return ViTImageProcessorPil(**kwargs)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY, num_labels=5, hidden_act="gelu")
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # initializer_range 0.02 makes logits spanning ~0.05; sharpen them
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    path = save_checkpoint(model, tmp_path_factory.mktemp("vit_cls"), _processor(size={"height": 32, "width": 32}))
    return path, model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.ViTConfig(**TINY, hidden_act="gelu_new", qkv_bias=False)
    model = transformers.ViTModel(config).eval()  # with its pooler: loading must drop it
    path = save_checkpoint(model, tmp_path_factory.mktemp("vit_base"), _processor(size={"height": 32, "width": 32}))
    return path, model


def test_classifier_logits_match_transformers(classifier_dir):
    path, reference = classifier_dir
    ours = load_pipeline(path).model
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
    assert_close(ours(pixels), expected)
    # One image at a time equals the batch.
    for i in range(3):
        assert_close(ours(pixels[i:i + 1]), expected[i:i + 1])


@pytest.mark.parametrize("height,width", [(48, 48), (40, 56), (24, 32)])
def test_interpolated_position_embeddings_match_transformers(classifier_dir, height, width):
    path, reference = classifier_dir
    ours = load_pipeline(path).model
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, interpolate_pos_encoding=True).logits
    assert_close(ours(pixels, interpolate_pos_encoding=True), expected)


def test_size_mismatch_without_interpolation_is_an_error(classifier_dir):
    path, _ = classifier_dir
    ours = load_pipeline(path).model
    with pytest.raises(ValueError, match="doesn't match"):
        ours(torch.zeros(1, 3, 48, 48))


def test_base_model_hidden_states_match_transformers(base_dir):
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.models.vit import load_model
    from pipeserve.pipelines.base import LoadOptions

    path, reference = base_dir
    ours = load_model(resolve(str(path)), LoadOptions(), head="base")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
    assert_close(ours(pixels), expected)


def test_bfloat16_matches_transformers_in_bfloat16(classifier_dir):
    """Logits against transformers' model cast to bfloat16, within the tolerance derived in
    harness.reduced_precision_tolerance (unit roundoff 2^-8 and transformers' own bfloat16
    error), which must be a small fraction of the logits' spread; the predicted labels agree."""
    import copy

    path, reference = classifier_dir
    ours = load_pipeline(path, dtype="bfloat16").model
    assert ours.classifier.packed.dtype is torch.bfloat16  # a PackedLinear on CPU
    reference_low = copy.deepcopy(reference).to(torch.bfloat16)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
        expected_low = reference_low(pixel_values=pixels.bfloat16()).logits
        got = ours(pixels.bfloat16())
    assert got.dtype is torch.bfloat16
    assert_close_in_precision(got, expected_low, expected, torch.bfloat16)
    assert got.float().argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_unknown_head_and_missing_classifier_are_refused(classifier_dir, base_dir):
    from pipeserve.errors import ModelLoadFailed
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.models.vit import load_model
    from pipeserve.pipelines.base import LoadOptions

    with pytest.raises(ModelLoadFailed, match="no 'causal_lm' head"):
        load_model(resolve(str(classifier_dir[0])), LoadOptions(), head="causal_lm")
    # A base checkpoint has no classifier weights: loading it as a classifier with labels must
    # fail loudly instead of running with uninitialised memory.
    path = base_dir[0]
    config = json.loads((path / "config.json").read_text())
    files = resolve(str(path))
    files = type(files)(files.name, files.path, {**config, "id2label": {"0": "a", "1": "b"}})
    with pytest.raises(ModelLoadFailed, match="missing .*classifier"):
        load_model(files, LoadOptions(), head="image_classification")


# Config fields ViT honours beyond sizes (qkv_bias and gelu_new: base_dir above), each set to a
# value that changes transformers' output against the base config (asserted).
CONFIG_VARIANTS = {"layer_norm_eps": 1e-1, "hidden_act": "relu", "num_channels": 1}


@pytest.mark.parametrize("field", list(CONFIG_VARIANTS))
def test_config_variant_matches_transformers(tmp_path, field):
    from harness import PARITY_ATOL

    value = CONFIG_VARIANTS[field]
    channels = value if field == "num_channels" else 3
    pixels = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(6))
    outputs = {}
    for name, extra in (("base", {}), ("variant", {field: value})):
        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY, num_labels=5, **extra)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(8.0)
        path = save_checkpoint(model, tmp_path / name, _processor(size={"height": 32, "width": 32}))
        with torch.no_grad():
            outputs[name] = model(pixel_values=pixels if name == "variant" else pixels[:, :1].expand(-1, 3, -1, -1)
                                  if field == "num_channels" else pixels).logits
    assert (outputs["variant"] - outputs["base"]).abs().max() > 100 * PARITY_ATOL, f"{field} changes nothing here"
    ours = load_pipeline(path).model
    assert_close(ours(pixels), outputs["variant"])
