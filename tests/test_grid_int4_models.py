"""LoadOptions.quantization "grouped" on tiny GGUF checkpoints (Gemma 3, Llama): the post-load
pass holds every block linear (Gemma's fused projections included) as int4 planes on the file's
own grids, the tied head stays the embedding's float32 weight, the memory kinds count the
planes, tokens do not depend on the batch, and where the form cannot apply the load is refused
with QUANTIZATION_UNAVAILABLE instead of silently loading float weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gguf_checkpoints import build_gemma3_gguf, build_llama_gguf
from harness import load_pipeline

from native_kernels import require_native_kernels
from pipeserve.errors import ModelLoadFailed
from pipeserve.layers import grid_int4, grid_native
from pipeserve.layers.grid_int4 import GridInt4Linear

pytestmark = pytest.mark.skipif(not grid_int4.available(), reason="no int4 CPU kernel / bfloat16 support here")

BUILDERS = {"gemma3": build_gemma3_gguf, "llama": build_llama_gguf}
# Q4_0 blocks: d * (q - 8), 16 levels (one plane); Q5_0: d * (q - 16), 32 levels (two planes)
PLANES = {"Q4_0": 1, "Q5_0": 2}


@pytest.fixture(scope="module", params=[("gemma3", "Q4_0"), ("gemma3", "Q5_0"), ("llama", "Q5_0")],
                ids=lambda p: "-".join(p))
def pair(request, tmp_path_factory):
    require_native_kernels()  # the grouped form's kernel where it is built (tests/test_grid_int4.py: torch's)
    family, qtype = request.param
    path, _ = BUILDERS[family](tmp_path_factory.mktemp(f"grid-{family}-{qtype}"), qtype)
    exact = load_pipeline(path, quantization="none")
    grouped = load_pipeline(path, quantization="grouped")
    yield family, qtype, exact, grouped
    exact.close()
    grouped.close()


def test_every_block_linear_is_held_in_planes_of_the_files_grid(pair):
    family, qtype, _, grouped = pair
    model = grouped.model
    planes = {name: m for name, m in model.named_modules() if isinstance(m, GridInt4Linear)}
    layers = model.model.layers
    expected = (["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"] if family == "gemma3"
                else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    blocks = [f"model.layers.{i}.{n}" for i in range(len(layers)) for n in expected]
    # an untied head is one more linear (where the kernel takes its shape: rows in blocks of 16)
    tied = model.config.tie_word_embeddings
    head = [] if tied or model.config.vocab_size % 16 else ["lm_head"]
    assert sorted(planes) == sorted(blocks + head)
    # 16-level blocks take one plane, 32-level ones two: the file's grid was found, not requantized
    assert {m.planes for m in planes.values()} == {PLANES[qtype]}
    assert {m.kernel for m in planes.values()} == {"native"}
    if tied:  # the tied head stays a plain linear on the embedding's float32 weight
        assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.dtype == torch.float32


def test_logits_follow_the_float_path(pair):
    """The planes hold the file's values; what differs is bfloat16 (scales, activations, each
    linear's output): logits within a few percent of their range, the same greedy tokens."""
    _, _, exact, grouped = pair
    ids = torch.tensor([exact.encode("hello world, the quick brown fox")])
    with torch.no_grad():
        reference, got = exact.model(ids)[0], grouped.model(ids)[0]
    relative = ((got - reference).abs().max() / reference.abs().max()).item()
    assert relative < 0.05, relative
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_tokens_do_not_depend_on_the_batch(pair):
    _, _, _, grouped = pair
    prompts = ["hello world", "the quick brown fox jumps", "a", "over the lazy dog and the cat"]
    options = {"max_new_tokens": 10, "min_new_tokens": 10}
    alone = [[t.token for t in grouped.generate([p], options)[0].sequences[0].tokens] for p in prompts]
    together = [[t.token for t in r.sequences[0].tokens] for r in grouped.generate(prompts, options)]
    assert together == alone


def test_memory_counts_the_planes(pair):
    """ModelInfo's kinds (layers/memory.py): the levels and their float32 steps and origins are
    the weights' only copy, counted under "weights" where the float path counts its packed
    float32 linears under "packed"; the rest (embedding, norms, the head's int8 screen) is the same."""
    _, qtype, exact, grouped = pair
    linears = [m for m in grouped.model.modules() if isinstance(m, GridInt4Linear)]
    plane_bytes = sum(b.nbytes for m in linears for b in m.buffers())
    weights = sum(m.in_features * m.out_features for m in linears)
    # per 32 weights: 16 bytes of nibbles (and 4 of fifth bits for Q5_0's 32 levels), plus a
    # float32 step and origin
    assert plane_bytes == weights * ({"Q4_0": 16, "Q5_0": 20}[qtype] + 8) / 32
    float_usage, usage = exact.memory_usage(), grouped.memory_usage()
    # what stays float is packed as before, but a tied head: the float path packs a copy of it,
    # here it stays the embedding's one weight (as with row int8)
    config = grouped.model.config
    tied_copy = 4 * config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    assert usage["packed"] == float_usage["packed"] - 4 * weights - tied_copy
    # the float path's block linears also keep their dense float32 weight for 1-3 row steps
    # ("few_rows_dense", layers/packed_linear.py): weights the grouped form does not hold
    # (a tied head's dense weight is the embedding itself, not a copy)
    embedding = exact.model.model.embed_tokens.weight.data_ptr()
    dense_copies = sum(b.nbytes for m in exact.model.modules() for name, b in m.named_buffers(recurse=False)
                       if name == "dense_weight" and b.data_ptr() != embedding)
    assert dense_copies in (0, 4 * weights)
    assert usage["weights"] == float_usage["weights"] - dense_copies + plane_bytes
    assert usage["screening"] == float_usage["screening"]
    assert grouped.memory_bytes() < exact.memory_bytes()


def test_refused_where_the_form_cannot_apply(tmp_path, monkeypatch):
    """A family without the pass (GPT-2's Conv1D), or a CPU without the kernel: a clear load
    error, not float weights the caller did not ask for."""
    from generation_checkpoints import build

    build("gpt2", tmp_path / "gpt2")
    with pytest.raises(ModelLoadFailed) as refused:
        load_pipeline(tmp_path / "gpt2", quantization="grouped")
    assert refused.value.reason == "QUANTIZATION_UNAVAILABLE" and "GPT2" in str(refused.value)

    path, _ = build_llama_gguf(tmp_path / "llama", "Q4_0")
    monkeypatch.setattr(grid_int4, "available", lambda: False)
    monkeypatch.setattr(grid_native, "available", lambda: False)
    with pytest.raises(ModelLoadFailed) as refused:
        load_pipeline(path, quantization="grouped")
    assert refused.value.reason == "QUANTIZATION_UNAVAILABLE" and "bfloat16" in str(refused.value)
    assert "native kernels are not built" in str(refused.value)
