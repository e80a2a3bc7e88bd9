"""The one load sequence every family goes through:

    read the checkpoint (formats.read_checkpoint) -> the family's recipe for it (which module,
    which checkpoint names) -> build the module without initialising it -> tie shared weights ->
    copy the tensors in strictly (weights.assign) -> the family's finishing touches -> eval.

A family module says only what is specific to it, as a ModuleRecipe; the speed passes
(int8, placement, packing, the verified head: layers/passes.py) run after this, from outside.
With device "auto" the module is built on the CPU and the placement pass moves it.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import ModelLoadFailed
from .formats import Checkpoint, read_checkpoint
from .hub import ModelFiles
from .weights import assign, empty_module, parse_dtype


def keep_name(name: str) -> str | None:
    return name


@dataclass
class ModuleRecipe:
    """How one family head takes a checkpoint's tensors.

    build: the module (built on the meta device first, so it may be full size).
    rename: checkpoint name -> our name, None to skip the tensor.
    tied: our name -> our name it copies when the checkpoint omits it.
    ignore_missing: our names a checkpoint may lack (buffers we compute), or a function of the
        built module giving them.
    prepare: fixes up the checkpoint's tensors before assignment (aliases of a shared table).
    finish: after assignment (share storage between tied modules, fuse projections).
    """

    build: Callable[[], nn.Module]
    rename: Callable[[str], str | None] = keep_name
    tied: Mapping[str, str] = field(default_factory=dict)
    ignore_missing: Iterable[str] | Callable[[nn.Module], Iterable[str]] = ()
    prepare: Callable[[MutableMapping[str, torch.Tensor]], None] | None = None
    finish: Callable[[nn.Module, Mapping[str, torch.Tensor]], None] | None = None
    # The family computes correctly with its linear and embedding weights kept in a narrower
    # storage dtype (LoadOptions.weights_dtype; layers/half_storage.py widens them per product).
    half_storage: bool = False


def build_device(options) -> torch.device:
    """Where the module is built: the options' device, or the CPU for a device map."""
    return torch.device("cpu") if options.device == "auto" else torch.device(options.device)


def storage_dtype(options) -> torch.dtype:
    """The dtype the weights are read and stored in: LoadOptions.weights_dtype where set (only
    float16 under a float32 model: layers/half_storage.py), else the compute dtype."""
    compute = parse_dtype(options.dtype)
    storage = parse_dtype(getattr(options, "weights_dtype", "") or None, compute)
    if storage != compute and not (storage == torch.float16 and compute == torch.float32):
        raise ModelLoadFailed(f"weights_dtype {options.weights_dtype!r} with dtype {options.dtype!r}: weights "
                              "can be stored in float16 under a float32 model, or as the model's dtype",
                              reason="INVALID_DTYPE")
    quantized = getattr(options, "load_in_8bit", False) or getattr(options, "quantization", None) not in (None, "none")
    if storage != compute and quantized:
        way = "load_in_8bit" if getattr(options, "load_in_8bit", False) else f"quantization {options.quantization}"
        raise ModelLoadFailed(f"weights_dtype float16 and {way} are two ways to store the weights; "
                              "choose one", reason="INVALID_DTYPE")
    return storage


def load_module(files: ModelFiles, options, recipe: Callable[[Checkpoint], ModuleRecipe]) -> nn.Module:
    """`options` is a LoadOptions (device, dtype, weights_dtype, allow_pickle); `recipe` the
    family's. With float16 weights_dtype the module is built and filled in float16 (a
    CTranslate2 file's float16 tensors stay views of its mapping); the post-load passes
    (layers/passes.py HALF_STORAGE) then make it compute in float32."""
    device, dtype = build_device(options), storage_dtype(options)
    checkpoint = read_checkpoint(files, device=device, dtype=dtype, allow_pickle=options.allow_pickle)
    plan = recipe(checkpoint)
    if dtype != parse_dtype(options.dtype) and not plan.half_storage:
        raise ModelLoadFailed(f"weights_dtype {options.weights_dtype!r} is not available for this model's "
                              "family: it loads with weights in its dtype", reason="INVALID_DTYPE")
    model = empty_module(plan.build, device=device, dtype=dtype)
    for module in model.modules():
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()  # one storage for an embedding and the output projection tied to it
    state = checkpoint.state
    if plan.prepare is not None:
        plan.prepare(state)
    ignore = plan.ignore_missing(model) if callable(plan.ignore_missing) else plan.ignore_missing
    # CTranslate2 tensors are the reader's own float32 conversions (views of model.bin only in
    # the file's dtype, float16, which the reader maps copy-on-write): the module takes them
    # instead of copying, so the load does not hold the model twice. Safetensors views: copied.
    assign(model, state, rename=plan.rename, tied=plan.tied, ignore_missing=ignore,
           take=checkpoint.format == "ctranslate2")
    if plan.finish is not None:
        plan.finish(model, state)
    del state
    checkpoint.release()
    return model.eval()
