"""oneDNN-prepacked linear layers (packed_linear.py): same map as nn.Linear / GPT-2's Conv1D up to
float rounding, any leading shape and row count, tied embeddings untouched, memory counted."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeserve.layers.conv1d import Conv1D
from pipeserve.layers.packed_linear import PackedLinear, pack_linears, supported
from pipeserve.checkpoints.weights import module_bytes, module_device

pytestmark = pytest.mark.skipif(not supported(torch.empty(1)), reason="this torch has no oneDNN")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 24)
        self.conv1d = Conv1D(24, 8)
        nn.init.normal_(self.conv1d.weight, std=0.2)  # Conv1D leaves its tensors uninitialised
        nn.init.normal_(self.conv1d.bias, std=0.2)
        self.head = nn.Linear(8, 50, bias=False)
        self.tied_head = nn.Linear(16, 50, bias=False)
        self.tied_head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.conv1d(self.proj(x))), self.tied_head(x)


def test_packed_model_matches_dense_for_any_row_count():
    torch.manual_seed(0)
    model = Tiny().eval().requires_grad_(False)
    inputs = [torch.randn(1, 16), torch.randn(3, 7, 16), torch.randn(200, 16), torch.randn(4, 9, 16)[:, 2:5]]
    expected = [model(x) for x in inputs]
    assert pack_linears(model) == 4
    assert all(type(m) is PackedLinear for m in (model.proj, model.conv1d, model.head, model.tied_head))
    for x, (head, tied) in zip(inputs, expected):
        ours_head, ours_tied = model(x)
        assert ours_head.shape == head.shape and ours_tied.shape == tied.shape
        torch.testing.assert_close(ours_head, head, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_tied, tied, atol=1e-5, rtol=1e-5)


def test_tied_embedding_keeps_its_dense_rows_and_memory_is_counted():
    model = Tiny().eval().requires_grad_(False)
    rows = model.embed.weight.clone()
    before = module_bytes(model)
    pack_linears(model)
    assert torch.equal(model.embed(torch.arange(50)), rows)
    # Untied layers move to the packed layout (same bytes); the tied head adds its own copy.
    assert module_bytes(model) == before + rows.numel() * 4
    assert module_device(model.head) == torch.device("cpu")
    assert "packed" not in model.state_dict() and not any(k.endswith(".packed") for k in model.state_dict())


def test_bfloat16_and_unsupported_layers():
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8).half()).eval()
    assert pack_linears(model) == 1  # float16 has no packed CPU kernel here: left as is
    assert type(model[0]) is PackedLinear and type(model[1]) is nn.Linear
    x = torch.randn(2, 8).bfloat16()
    assert model[0](x).dtype == torch.bfloat16


def test_pipelines_pack_unless_asked_not_to(tmp_path):
    from harness import load_pipeline, save_checkpoint
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8, num_labels=3)
    path = save_checkpoint(ViTForImageClassification(config).eval(), tmp_path / "vit",
                           ViTImageProcessorPil(size={"height": 32, "width": 32}))
    packed = load_pipeline(path).model
    dense = load_pipeline(path, packed_linear=False).model
    assert type(packed.classifier) is PackedLinear and type(dense.classifier) is nn.Linear
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed(pixels), dense(pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
def test_fused_activation_equals_the_separate_op(activation):
    from pipeserve.layers.packed_linear import PackedLinear, linear_activation

    torch.manual_seed(0)
    dense = nn.Linear(48, 96)
    packed = PackedLinear(dense.weight, dense.bias)
    x = torch.randn(3, 7, 48)
    separate = {"gelu": F.gelu, "gelu_new": lambda y: F.gelu(y, approximate="tanh"), "relu": F.relu}[activation]
    with torch.inference_mode():
        torch.testing.assert_close(linear_activation(packed, x, activation, separate), separate(dense(x)),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(linear_activation(dense, x, activation, separate), separate(dense(x)))
        # no post-op for this name: the function after the packed kernel
        swish = torch.nn.functional.silu
        torch.testing.assert_close(linear_activation(packed, x, "silu", swish), swish(dense(x)), rtol=1e-5, atol=1e-6)
