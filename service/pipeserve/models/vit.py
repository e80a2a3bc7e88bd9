"""ViT (Vision Transformer) for ViTModel / ViTForImageClassification checkpoints.

Module names equal the checkpoint keys that save_pretrained writes and the Hub holds
(`vit.encoder.layer.N.attention.attention.query.weight`, ...), so loading needs no rename table
beyond dropping the pooler that classification checkpoints may carry and the `vit.` prefix
that base checkpoints lack.

Reference: transformers/models/vit/modeling_vit.py (transformers 5.x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.hub import ModelFiles
from ..checkpoints.family_config import config_from_dict
from ..checkpoints.formats import Checkpoint
from ..checkpoints.loader import ModuleRecipe, load_module
from ..errors import ModelLoadFailed
from ..layers.activations import activation
from ..layers.packed_linear import linear_activation

HEADS = ("base", "image_classification")


@dataclass(frozen=True)
class ViTConfig:
    """config.json of a ViT checkpoint (HF field names; defaults = transformers' ViTConfig)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ViTConfig":
        # id2label keys are strings in JSON; num_labels alone (no id2label) means LABEL_i names.
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        if not id2label and config.get("num_labels"):
            id2label = {i: f"LABEL_{i}" for i in range(int(config["num_labels"]))}
        return config_from_dict(cls, config, id2label=id2label)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ViTPatchEmbeddings(nn.Module):
    """Ports transformers.models.vit.modeling_vit.ViTPatchEmbeddings: a stride-P conv per patch."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size,
                                    kernel_size=config.patch_hw, stride=config.patch_hw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H/P * W/P, D)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """Ports modeling_vit.ViTEmbeddings (no mask token): CLS token + patches + positions."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        grid_h, grid_w = (i // p for i, p in zip(config.image_hw, config.patch_hw))
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.empty(1, grid_h * grid_w + 1, config.hidden_size))

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Ports ViTEmbeddings.interpolate_pos_encoding: bicubic resize of the square grid of
        position embeddings to the input's patch grid (the CLS position is kept)."""
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        dim = self.position_embeddings.shape[-1]
        patch_h, patch_w = self.config.patch_hw
        side = int(num_positions ** 0.5)
        grid = self.position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height // patch_h, width // patch_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.position_embeddings[:, :1], grid), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # (B, N, D)
        embeddings = torch.cat((self.cls_token.expand(batch, -1, -1), patches), dim=1)  # (B, N+1, D)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(patches.shape[1], height, width)
        if (height, width) != self.config.image_hw:
            raise ValueError(f"input image size ({height}*{width}) doesn't match the model's "
                             f"{self.config.image_hw}; pass interpolate_pos_encoding=True")
        return embeddings + self.position_embeddings


class ViTSelfAttention(nn.Module):
    """Ports the checkpoint layout of modeling_vit's attention (query/key/value) with SDPA."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        shape = (batch, length, self.num_heads, dim // self.num_heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh), scale 1/sqrt(Dh)
        return out.transpose(1, 2).reshape(batch, length, dim)


class ViTSelfOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class ViTAttention(nn.Module):
    """Ports modeling_vit.ViTAttention (q/k/v projections, then the output projection)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ViTIntermediate(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class ViTOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class ViTLayer(nn.Module):
    """Ports modeling_vit.ViTLayer: pre-norm attention and MLP blocks, each with a residual."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.act_name, self.act = config.hidden_act, activation(config.hidden_act)
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(linear_activation(self.intermediate.dense, self.layernorm_after(x),
                                                       self.act_name, self.act))


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViTModel(nn.Module):
    """Ports modeling_vit.ViTModel without the pooler (no task head here uses it)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> last hidden state (B, 1 + patches, D)."""
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        return self.layernorm(self.encoder(x))


class ViTForImageClassification(nn.Module):
    """Ports modeling_vit.ViTForImageClassification: a linear head on the CLS token."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vit = ViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels else nn.Identity()

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_labels)."""
        return self.classifier(self.vit(pixel_values, interpolate_pos_encoding)[:, 0])


def _rename(head: str):
    def rename(name: str) -> str | None:
        if ".pooler." in f".{name}":
            return None  # the pooler (tanh dense on CLS) feeds no head we serve
        if head == "base":
            return name.removeprefix("vit.")
        if not name.startswith(("vit.", "classifier.")):
            return "vit." + name  # a base ViTModel checkpoint loaded under the classifier head
        return name
    return rename


def load_model(files: ModelFiles, options, head: str = "image_classification") -> nn.Module:
    """Builds the ViT `head` from `files` on options' device and dtype, in eval mode."""
    if head not in HEADS:
        raise ModelLoadFailed(f"ViT has no {head!r} head; available: {', '.join(HEADS)}", reason="UNSUPPORTED_HEAD")
    return load_module(files, options, lambda checkpoint: _recipe(checkpoint, head, files.name))


def _recipe(checkpoint: Checkpoint, head: str, name: str) -> ModuleRecipe:
    config = ViTConfig.from_dict(checkpoint.config)
    if config.hidden_size % config.num_attention_heads:
        raise ModelLoadFailed(f"hidden_size {config.hidden_size} is not a multiple of "
                              f"num_attention_heads {config.num_attention_heads}", reason="BAD_CONFIG")
    if head == "image_classification" and not config.num_labels:
        raise ModelLoadFailed(f"{name} has no labels (id2label/num_labels) for image classification",
                              reason="BAD_CONFIG")
    factory = ViTForImageClassification if head == "image_classification" else ViTModel
    return ModuleRecipe(lambda: factory(config), rename=_rename(head))


__all__ = ["ViTConfig", "ViTModel", "ViTForImageClassification", "load_model"]
