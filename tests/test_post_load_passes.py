"""The post-load passes (layers/passes.py): one ordered list, quantize -> place -> pack ->
verified head, each skipped by its own predicate where it does not apply; and the one load
sequence they follow (checkpoints/loader.py) with its config helper."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pipeserve.checkpoints.family_config import config_from_dict
from pipeserve.layers import passes, verified_head
from pipeserve.layers.packed_linear import PackedLinear, supported
from pipeserve.layers.quantization import Int8Linear
from pipeserve.pipelines.base import LoadOptions

VOCAB, DIM = 64, 16


class TinyLM(nn.Module):
    """A decoder-only shape that opts into every pass (as models/causal_lm.CausalLM does)."""

    post_load = frozenset({"int8", "device_map", "column_major_head"})
    layer_devices = None

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, dtype=dtype)
        self.layers = nn.ModuleList([nn.Linear(DIM, DIM, dtype=dtype) for _ in range(2)])
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False, dtype=dtype)
        self.lm_head.weight = self.embed.weight  # tied


class TinyEncoder(nn.Module):
    """A family that opts into nothing beyond packing (an encoder: no int8, no device map)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(DIM, DIM)


def _site(model: TinyLM, exact_from: int | None = None) -> passes.VerifiedHeadSite:
    return passes.VerifiedHeadSite(model, "verified_head", model.embed.weight, exact_from)


def _ran(model, exact_from=None, site=True, **options) -> list[str]:
    context = passes.PostLoad(LoadOptions(**options), _site(model, exact_from) if site else None)
    return passes.apply_post_load_passes(model, context)


def test_the_list_is_fuse_half_storage_quantize_native_kernels_place_pack_verified_head():
    assert [p.name for p in passes.POST_LOAD_PASSES] == ["fuse_projections", "half_storage", "quantize",
                                                         "native_kernels", "place", "pack", "verified_head"]


def test_passes_run_in_list_order_and_skipped_ones_do_not_run():
    calls = []
    steps = tuple(passes.Pass(name, (lambda m, c, on=on: on), (lambda m, c, name=name: calls.append(name)))
                  for name, on in [("first", True), ("off", False), ("second", True)])
    assert passes.apply_post_load_passes(nn.Linear(2, 2), passes.PostLoad(LoadOptions()), steps) == ["first", "second"]
    assert calls == ["first", "second"]


def test_defaults_on_cpu_pack_then_install_the_verified_head_on_the_dense_tied_weight():
    model = TinyLM()
    weight = model.embed.weight
    if not supported(weight):
        pytest.skip("this torch has no oneDNN packed linear")
    ran = _ran(model)
    expected = ["pack", "verified_head"] if verified_head.available(weight) else ["pack"]
    assert ran == expected
    assert isinstance(model.lm_head, PackedLinear) and all(isinstance(l, PackedLinear) for l in model.layers)
    assert model.embed.weight is weight  # the embedding keeps the dense copy
    if "verified_head" in ran:
        assert isinstance(model.verified_head, verified_head.VerifiedHead)
        assert model.verified_head.weight.data_ptr() == weight.data_ptr()  # shared, not copied


def test_quantize_only_with_the_option_and_only_for_families_that_take_int8():
    assert "quantize" not in _ran(TinyLM(), packed_linear=False)
    encoder = TinyEncoder()
    assert "quantize" not in _ran(encoder, site=False, load_in_8bit=True, packed_linear=False)
    assert type(encoder.dense) is nn.Linear
    model = TinyLM()
    ran = _ran(model, load_in_8bit=True)
    assert ran[0] == "quantize" and "verified_head" not in ran  # an int8 head is not screened
    assert all(isinstance(l, Int8Linear) for l in [*model.layers, model.lm_head])
    assert not any(m.training for m in model.modules())


def test_place_only_for_device_auto_and_a_device_map_only_for_families_that_take_one():
    model = TinyLM()
    assert "place" not in _ran(model, packed_linear=False)
    assert model.layer_devices is None
    ran = _ran(model, device="auto", packed_linear=False)
    assert ran[0] == "place"
    assert len(model.layer_devices) == len(model.layers)  # the device map the forward pass follows
    encoder = TinyEncoder()
    assert _ran(encoder, site=False, device="auto", packed_linear=False) == ["place"]
    assert encoder.dense.weight.device.type == LoadOptions(device="auto").torch_device.type
    assert not hasattr(encoder, "layer_devices")


def test_pack_skipped_when_off_and_nothing_left_to_lay_out():
    encoder = TinyEncoder()
    assert _ran(encoder, site=False, packed_linear=False) == []
    assert type(encoder.dense) is nn.Linear


def test_pack_off_stores_an_opted_in_head_column_major_instead():
    model = TinyLM()
    before = model.lm_head.weight.detach().clone()
    assert _ran(model, packed_linear=False) == ["pack"]  # the layout half of the pass
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.t().is_contiguous()
    assert model.embed.weight is model.lm_head.weight  # still tied
    torch.testing.assert_close(model.lm_head.weight, before, rtol=0, atol=0)
    assert _ran(model, packed_linear=False) == []  # already laid out: the predicate says so


def test_pack_skips_a_dtype_without_a_packed_kernel():
    encoder = TinyEncoder().half()
    assert _ran(encoder, site=False) == []
    assert type(encoder.dense) is nn.Linear


def test_verified_head_skipped_without_a_site_or_with_timestamp_rows_out_of_range():
    assert "verified_head" not in _ran(TinyLM(), site=False)
    for exact_from in (0, VOCAB):
        model = TinyLM()
        assert "verified_head" not in _ran(model, exact_from=exact_from)
        assert not hasattr(model, "verified_head")


@pytest.mark.skipif(not verified_head.available(torch.zeros(2, 2)), reason="no native bfloat16 oneDNN on this CPU")
def test_verified_head_keeps_timestamp_rows_exact_where_the_site_says():
    model = TinyLM()
    assert _ran(model, exact_from=VOCAB - 8)[-1] == "verified_head"
    assert model.verified_head.exact_from == VOCAB - 8


@dataclass(frozen=True)
class _Config:
    width: int = 4
    kernel: tuple[int, ...] = (3, 3)
    names: list[str] | None = None
    labels: dict | None = None


def test_config_from_dict_filters_fields_defaults_nulls_and_makes_declared_tuples():
    config = config_from_dict(_Config, {"width": None, "kernel": [5, 1], "names": ["a"], "unused": 1,
                                        "labels": {"0": "x"}}, labels={0: "x"})
    assert config == _Config(width=4, kernel=(5, 1), names=["a"], labels={0: "x"})


# ---- the one load sequence (checkpoints/loader.py) ------------------------------------------

class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)

    def tie_weights(self):
        self.head.weight = self.embed.weight


def _files(tmp_path, tensors=None, config=None):
    from safetensors.torch import save_file

    from pipeserve.checkpoints.hub import ModelFiles

    if tensors is not None:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    return ModelFiles(name="tiny", path=tmp_path, config=config or {"model_type": "tiny"})


def test_load_sequence_reads_builds_ties_assigns_then_finishes(tmp_path):
    from pipeserve.checkpoints.loader import ModuleRecipe, load_module

    table = torch.arange(12, dtype=torch.float32).view(4, 3)
    steps = []

    def recipe(checkpoint):
        steps.append(("recipe", checkpoint.config["model_type"]))
        return ModuleRecipe(_Tied, rename=lambda name: name.removeprefix("old."), tied={"head.weight": "embed.weight"},
                            prepare=lambda state: steps.append(("prepare", sorted(state))),
                            finish=lambda model, state: steps.append(("finish", model.head.weight is model.embed.weight)))

    model = load_module(_files(tmp_path, {"old.embed.weight": table}), LoadOptions(dtype="bfloat16"), recipe)
    assert steps == [("recipe", "tiny"), ("prepare", ["old.embed.weight"]), ("finish", True)]
    assert model.embed.weight.dtype == torch.bfloat16 and not model.training
    torch.testing.assert_close(model.head.weight.float(), table)


def test_a_family_rejects_its_config_before_any_weights_are_read(tmp_path):
    from pipeserve.checkpoints.loader import load_module
    from pipeserve.errors import ModelLoadFailed

    def recipe(checkpoint):
        raise ModelLoadFailed("bad config", reason="BAD_CONFIG")

    with pytest.raises(ModelLoadFailed) as failure:  # no weights in the directory either
        load_module(_files(tmp_path), LoadOptions(), recipe)
    assert failure.value.reason == "BAD_CONFIG"


def test_pickled_weights_are_read_only_when_allowed(tmp_path):
    from pipeserve.checkpoints.formats import read_checkpoint
    from pipeserve.errors import ModelLoadFailed

    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    files = _files(tmp_path)
    with pytest.raises(ModelLoadFailed) as failure:
        read_checkpoint(files, device="cpu", dtype=torch.float32).state
    assert failure.value.reason == "PICKLE_REFUSED"
    checkpoint = read_checkpoint(files, device="cpu", dtype=torch.float32, allow_pickle=True)
    assert checkpoint.format == "transformers" and torch.equal(checkpoint.state["w"], torch.ones(2))


def test_model_files_never_read_checkpoint_files():
    """Formats are read in checkpoints/ only: no family imports a reader or opens a file."""
    import ast
    from pathlib import Path

    import pipeserve.models

    readers = {"load_state_dict", "read_whisper", "read_variables", "read_checkpoint", "safe_open", "load_file"}
    found = []
    for path in Path(pipeserve.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in ("safetensors", "torch"):
                found += [f"{path.name}: from {node.module}" for a in node.names if a.name in readers]
            elif isinstance(node, ast.alias) and node.name in readers:
                found.append(f"{path.name}: imports {node.name}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    {"open", "read_text", "read_bytes", "load"} | readers):
                found.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}")
    assert not found, found
