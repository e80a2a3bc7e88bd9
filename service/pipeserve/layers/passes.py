"""The post-load passes, one ordered list applied to every freshly loaded model from outside it:

    fuse projections (q/k/v, gate/up: one linear each) -> half storage (float16 weights,
    float32 compute) -> quantize (int8 weights, or the "grouped" int4 planes) -> native kernels
    (a quantized model's norms and decoding attention on pipeserve's kernels) -> place (device
    "auto": a device map) -> pack (oneDNN packed linears; a head left dense is stored
    column-major) -> verified head (greedy steps' screened output projection)

The order matters: fusing comes first so that every later pass sees the fused linears as
ordinary ones (one int8 scale per output row either way), int8 replaces linears before anything measures or moves them, placement
decides which weights stay on the CPU before packing (only CPU weights pack), and the verified
head screens the dense weight that packing leaves to the tied embedding. Each pass has its own
predicate and is skipped where it does not apply (the option is off, the weights are on a GPU,
the family has no such head). A family opts into the passes that only some families take
through its `post_load` attribute ("int8", "device_map", "column_major_head"; models/causal_lm.py;
"fuse_projections": the groups its `fusable_projections()` lists become one linear each;
"row_int8": int8 weights quantize activations per row, layers/row_int8.py, models/gemma3.py;
"grid_int4": the quantization "grouped" form, layers/grid_int4.py; "native_kernels": its quantized
forms take kernels/ for norms and decoding attention, layers/norms.py, layers/kv_cache.py;
"few_rows_dense": packed linears also keep their dense float32 weight for steps of 1-3 rows,
layers/packed_linear.py; "share_tied_head": the tied head keeps the embedding's one weight, column-major, instead of a
packed copy; "exact_head": greedy steps take the exact projection, no screening copy;
models/whisper.py);
the pipeline that owns a model says where its verified head goes (VerifiedHeadSite), because
only it knows which rows are timestamps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelLoadFailed
from ..kernels import library
from . import verified_head as verified
from .int8_head import Int8ScreenedHead, int8_screen_available
from .device_map import dispatch
from .fused_linear import fuse_projections
from .grid_int4 import quantize_grid_int4, unavailable_reason as grid_int4_unavailable
from .half_storage import keep_half_storage
from .head_layout import column_major_head, column_major_head_applies
from .packed_linear import DENSE_ROWS, pack_linears, packable
from .quantization import quantize_int8
from .row_int8 import available as row_int8_available, quantize_row_int8


@dataclass(frozen=True)
class VerifiedHeadSite:
    """Where a screened output projection goes: `owner.<attribute>` = VerifiedHead(weight,
    exact_from); `weight` is the dense projection (the tied embedding's), rows from
    `exact_from` on (timestamps) are always computed exactly."""

    owner: nn.Module
    attribute: str
    weight: torch.Tensor
    exact_from: int | None = None
    # "bfloat16" (VerifiedHead: argmax, log-softmax, timestamp rows) or "int8" (Int8ScreenedHead:
    # the argmax only, a quarter of float32's bytes; layers/int8_head.py)
    screen: str = "bfloat16"


@dataclass(frozen=True)
class PostLoad:
    """What the passes see besides the model: the LoadOptions and the verified head's site."""

    options: Any
    verified_head: VerifiedHeadSite | None = None


@dataclass(frozen=True)
class Pass:
    name: str
    applies: Callable[[nn.Module, PostLoad], bool]
    apply: Callable[[nn.Module, PostLoad], None]


def accepts(model: nn.Module, what: str) -> bool:
    """The family opted into `what` (see the module doc)."""
    return what in getattr(model, "post_load", ())


def _quantize_applies(model: nn.Module, context: PostLoad) -> bool:
    # "grouped" is checked in _quantize: a family or CPU it cannot serve is refused, not skipped
    return grouped(context.options) or (context.options.load_in_8bit and accepts(model, "int8"))


def _quantize(model: nn.Module, context: PostLoad) -> None:
    if grouped(context.options):
        _quantize_grouped(model, context)
    elif _row_int8(model, context):
        # Per-row activations (batch-invariant; layers/row_int8.py). The tied head stays the
        # embedding's float32 weight: greedy rows read it through the int8 screen (exact choice,
        # whatever the batch), the others exactly.
        quantize_row_int8(model, skip=_tied_linears(model))
    else:
        # A tied lm_head gets its own int8 copy: decoding reads it every step, the embedding only
        # gathers rows, so the copy buys bandwidth for little memory.
        quantize_int8(model)
    model.eval()  # the new modules too


def grouped(options: Any) -> bool:
    """LoadOptions.quantization selects the grouped int4 planes (layers/grid_int4.py)."""
    return getattr(options, "quantization", None) == "grouped"


def _quantize_grouped(model: nn.Module, context: PostLoad) -> None:
    # Refused, not silently float, where the form cannot apply: the caller asked for its memory.
    why = grid_int4_unavailable(context.options.torch_device) if accepts(model, "grid_int4") else (
        f"{type(model).__name__} does not take the grouped int4 form")
    if why:
        raise ModelLoadFailed(f"quantization 'grouped' is not available: {why}", reason="QUANTIZATION_UNAVAILABLE")
    # The tied head stays the embedding's float32 weight, as with row int8 (see _quantize).
    quantize_grid_int4(model, skip=_tied_linears(model))


def _native_kernels_applies(model: nn.Module, context: PostLoad) -> bool:
    """Quantized weights on the CPU, a family with native kernels, the kernels built: its norms
    and decoding attention take them (layers/norms.py says why only quantized forms do)."""
    return accepts(model, "native_kernels") and _quantize_applies(model, context) \
        and context.options.torch_device.type == "cpu" and library.available()


def use_native_kernels(model: nn.Module) -> int:
    """Every module of `model` with a `native_kernels` switch (Gemma's norms, attention and
    blocks) takes pipeserve's kernels from now on; -> how many."""
    switched = [module for module in model.modules() if hasattr(module, "native_kernels")]
    for module in switched:
        module.native_kernels = True
    return len(switched)


def _row_int8(model: nn.Module, context: PostLoad) -> bool:
    """The family takes per-row int8 activations (its `post_load` says "row_int8"), the model
    is on the CPU and oneDNN has the int8 kernel (VNNI); elsewhere fbgemm's dynamic int8."""
    return accepts(model, "row_int8") and context.options.torch_device.type == "cpu" and row_int8_available()


def _tied_linears(model: nn.Module) -> set[int]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {id(m) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in embeddings}


def _place(model: nn.Module, context: PostLoad) -> None:
    if accepts(model, "device_map"):
        dispatch(model)  # decoder layers over the visible GPUs, then CPU
    else:
        model.to(context.options.torch_device)  # the whole model on the first GPU (or CPU)


def _pack_applies(model: nn.Module, context: PostLoad) -> bool:
    return ((context.options.packed_linear and packable(model))
            or (accepts(model, "column_major_head") and column_major_head_applies(model)))


def _pack(model: nn.Module, context: PostLoad) -> None:
    if context.options.packed_linear:
        # a row-int8 or grouped model's tied head stays the embedding's one weight (no float32 copy)
        share = (accepts(model, "share_tied_head") or (context.options.load_in_8bit and _row_int8(model, context))
                 or grouped(context.options))
        # "few_rows_dense": the family's decoding steps (1-3 rows) take F.linear on a kept dense
        # weight (layers/packed_linear.py DENSE_ROWS)
        pack_linears(model, share_tied=share, dense_rows=DENSE_ROWS if accepts(model, "few_rows_dense") else 0)
    if accepts(model, "column_major_head"):
        column_major_head(model)  # a head packing did not take: one GEMM over contiguous memory


def _verified_head_applies(model: nn.Module, context: PostLoad) -> bool:
    site = context.verified_head
    if site is None or accepts(model, "exact_head"):
        return False
    if site.screen == "int8" and _int8_screen_applies(site, context):
        return True
    if not verified.enabled(site.weight, context.options):
        return False
    return site.exact_from is None or 0 < site.exact_from < site.weight.shape[0]


def _int8_screen_applies(site: VerifiedHeadSite, context: PostLoad) -> bool:
    # the float32 embedding it rescores with stays (an fbgemm int8 head keeps its own copy)
    return context.options.packed_linear and site.exact_from is None and int8_screen_available(site.weight)


def _install_verified_head(model: nn.Module, context: PostLoad) -> None:
    # An int8 site takes the int8 screen where the CPU has oneDNN's int8 GEMM (VNNI), else the
    # bfloat16 screen where it runs bfloat16 natively (layers/int8_head.py).
    site = context.verified_head
    if site.screen == "int8" and _int8_screen_applies(site, context):
        head = Int8ScreenedHead(site.weight)
    else:
        head = verified.VerifiedHead(site.weight, site.exact_from)
    setattr(site.owner, site.attribute, head)


def _half_storage_applies(model: nn.Module, context: PostLoad) -> bool:
    # checkpoints/loader.storage_dtype allowed only float16 storage under a float32 model.
    options = context.options
    return (getattr(options, "weights_dtype", "") or options.dtype) != options.dtype and any(
        p.dtype == torch.float16 for p in model.parameters())


FUSE = Pass("fuse_projections", lambda model, c: accepts(model, "fuse_projections"),
            lambda model, c: fuse_projections(model))
HALF_STORAGE = Pass("half_storage", _half_storage_applies, lambda model, c: keep_half_storage(model))
QUANTIZE = Pass("quantize", _quantize_applies, _quantize)
NATIVE_KERNELS = Pass("native_kernels", _native_kernels_applies, lambda model, c: use_native_kernels(model))

PLACE = Pass("place", lambda model, c: c.options.device == "auto", _place)
PACK = Pass("pack", _pack_applies, _pack)
VERIFIED_HEAD = Pass("verified_head", _verified_head_applies, _install_verified_head)

POST_LOAD_PASSES: tuple[Pass, ...] = (FUSE, HALF_STORAGE, QUANTIZE, NATIVE_KERNELS, PLACE, PACK, VERIFIED_HEAD)


def apply_post_load_passes(model: nn.Module, context: PostLoad,
                           passes: tuple[Pass, ...] = POST_LOAD_PASSES) -> list[str]:
    """Runs each pass whose predicate holds, in order; -> the names of those that ran."""
    ran = []
    for step in passes:
        if step.applies(model, context):
            step.apply(model, context)
            ran.append(step.name)
    return ran
