"""Checkpoint tensors -> our modules: safetensors (single or sharded) loaded straight onto the
target device and dtype, pickled .bin only when explicitly allowed, and a strict assignment
with a short table of renames so that family modules keep checkpoint names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .errors import ModelLoadFailed

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None or name == "":
        return default
    if isinstance(name, torch.dtype):
        return name
    key = name.lower().removeprefix("torch.").removeprefix("dtype_")
    if key not in DTYPES:
        raise ModelLoadFailed(f"unknown dtype {name!r}; use float32, float16 or bfloat16", reason="INVALID_DTYPE")
    return DTYPES[key]


def weight_files(path: Path, *, prefix: str = "model", allow_pickle: bool = False) -> list[Path]:
    """The files holding a checkpoint's tensors, safetensors first."""
    single = path / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    index = path / f"{prefix}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadFailed(f"{index} names shards that are missing: {missing}", reason="WEIGHTS_MISSING")
        return [path / s for s in shards]
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if pickled and not allow_pickle:
        raise ModelLoadFailed(
            f"{path} holds only pickled weights ({pickled[0].name}); pickles can run code when loaded, "
            "so they are refused unless LoadModel sets allow_pickle", reason="PICKLE_REFUSED")
    if pickled:
        return pickled
    raise ModelLoadFailed(
        f"no weights in {path}: looked for {prefix}.safetensors, {prefix}.safetensors.index.json"
        + (" and pytorch_model*.bin" if allow_pickle else ""), reason="WEIGHTS_MISSING")


def load_state_dict(path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    allow_pickle: bool = False, prefix: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, floating ones cast to `dtype`, on `device`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path, prefix=prefix, allow_pickle=allow_pickle):
        if file.suffix == ".safetensors":
            part = load_file(str(file), device=str(device))
        else:
            part = torch.load(file, map_location=device, weights_only=True)
        state.update(part)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def assign(module: nn.Module, state: Mapping[str, torch.Tensor], *,
           rename: Callable[[str], str | None] = lambda name: name,
           ignore_missing: Iterable[str] = (), tied: Mapping[str, str] | None = None) -> None:
    """Copies checkpoint tensors into `module` by name, strictly.

    rename: checkpoint name -> our parameter name, or None to skip the tensor.
    ignore_missing: our names that a checkpoint may lack (buffers we compute ourselves).
    tied: our name -> our name it shares storage with when the checkpoint omits it.
    """
    ours = dict(module.state_dict())
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in state.items():
            target = rename(name)
            if target is None:
                continue
            if target not in ours:
                unexpected.append(name)
                continue
            dest = ours[target]
            if dest.shape != tensor.shape:
                raise ModelLoadFailed(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(dest.shape)} for {target}", reason="WEIGHTS_MISMATCH")
            dest.copy_(tensor)
            seen.add(target)
        for name, source in (tied or {}).items():
            if name not in seen and source in seen:
                ours[name].copy_(ours[source])
                seen.add(name)
    ignore = set(ignore_missing)
    missing = [n for n in ours if n not in seen and n not in ignore]
    if unexpected or missing:
        raise ModelLoadFailed(
            f"checkpoint does not match the model: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}", reason="WEIGHTS_MISMATCH")


def module_bytes(module: nn.Module) -> int:
    """Resident bytes of parameters and buffers (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def empty_module(factory: Callable[[], nn.Module], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Builds a module without random initialisation (weights come from the checkpoint next).

    Built on the meta device, then given real but uninitialised storage on `device`. Buffers
    that the checkpoint does not carry (position tables, masks) are recomputed by the
    module's `init_buffers()` where it has one.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    module = module.to(dtype)
    for sub in module.modules():
        init = getattr(sub, "init_buffers", None)
        if callable(init):
            init()
    return module.eval()
