"""Model resolution and weight loading: the Hub path through a pre-populated cache (the real
huggingface_hub code, offline), sharded safetensors, pickled checkpoints refused unless
allowed, dtype on load."""
from __future__ import annotations

import shutil

import pytest
import torch

from harness import assert_close, load_pipeline, save_checkpoint
from pipeserve.errors import ModelLoadFailed, ModelNotFound
from pipeserve.checkpoints.hub import resolve

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return model, processor, save_checkpoint(model, tmp_path_factory.mktemp("vit"), processor)


def _logits(pipeline, reference):
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipeline.model(pixels), reference(pixel_values=pixels).logits


def _populate_cache(cache, repo_id: str, source, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(source, repo / "snapshots" / revision)


def test_hub_id_resolves_from_prepopulated_cache_offline(vit, tmp_path, monkeypatch):
    model, _, path = vit
    cache = tmp_path / "hub"
    _populate_cache(cache, "tiny-org/tiny-vit", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    files = resolve("tiny-org/tiny-vit", offline=True)
    assert files.config["model_type"] == "vit"
    assert files.path.parent.name == "snapshots"
    pipeline = load_pipeline(files.path)
    assert_close(*_logits(pipeline, model))
    with pytest.raises(ModelNotFound) as info:
        resolve("tiny-org/absent", offline=True)
    assert "Hugging Face cache" in info.value.message and "offline" in info.value.message


def test_sharded_safetensors(vit, tmp_path):
    model, processor, _ = vit
    path = tmp_path / "sharded"
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    processor.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert_close(*_logits(load_pipeline(path), model))


def test_pickled_weights_refused_unless_allowed(vit, tmp_path):
    from safetensors.torch import load_file

    model, processor, source = vit
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    processor.save_pretrained(path)
    # transformers 5 no longer writes pickles; this is the layout older checkpoints have,
    # with the checkpoint's tensor names.
    torch.save(load_file(source / "model.safetensors"), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadFailed) as info:
        load_pipeline(path)
    assert info.value.reason == "PICKLE_REFUSED"
    assert_close(*_logits(load_pipeline(path, allow_pickle=True), model))


def test_missing_weights_and_dtype(vit, tmp_path):
    model, processor, path = vit
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(path / name, empty / name)
    with pytest.raises(ModelLoadFailed) as info:
        load_pipeline(empty)
    assert info.value.reason == "WEIGHTS_MISSING" and "model.safetensors" in info.value.message
    half = load_pipeline(path, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.describe()["dtype"] == "bfloat16"


def test_safetensors_are_read_lazily_and_cast(vit):
    from pipeserve.checkpoints.weights import LazyStateDict, load_state_dict

    _, _, path = vit
    state = load_state_dict(path, dtype=torch.float16)
    assert isinstance(state, LazyStateDict)
    name = next(iter(state))
    assert state[name].dtype == torch.float16
    state["alias"] = state[name]
    assert "alias" in state and len(state) == len(list(state))
    del state["alias"]
    assert "alias" not in state
