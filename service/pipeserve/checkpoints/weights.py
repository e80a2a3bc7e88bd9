"""Checkpoint tensors -> our modules: safetensors (single or sharded) loaded straight onto the
target device and dtype, pickled .bin only when explicitly allowed, and a strict assignment
with a short table of renames so that family modules keep checkpoint names.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from collections.abc import MutableMapping
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelLoadFailed

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


def dtype_name(name: str) -> str:
    """The canonical spelling of a dtype name ("fp16", "half" -> "float16"); a name DTYPES does
    not know comes back as given (lower case), for the caller's own check to refuse."""
    key = name.strip().lower()
    return str(DTYPES[key]).removeprefix("torch.") if key in DTYPES else key


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


class LazyStateDict(MutableMapping):
    """A checkpoint's tensors, read from safetensors one at a time when asked for.

    `assign` copies each tensor into the module and drops it, so loading peaks at the
    model's size plus its largest tensor instead of twice the model. Entries set by a
    family's loader (aliases, split tensors) live in an overlay.
    """

    def __init__(self, files: list[Path], device: str | torch.device, dtype: torch.dtype | None):
        from safetensors import safe_open

        self._dtype = dtype
        self._where: dict[str, Any] = {}
        self._overlay: dict[str, torch.Tensor] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device=str(device))
            for name in handle.keys():
                self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._overlay:
            return self._overlay[name]
        tensor = self._where[name].get_tensor(name)
        return _cast(tensor, self._dtype)

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._overlay[name] = tensor

    def __delitem__(self, name: str) -> None:
        if name not in self._overlay and name not in self._where:
            raise KeyError(name)
        self._overlay.pop(name, None)
        self._where.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from (name for name in self._overlay if name not in self._where)

    def __len__(self) -> int:
        return len(self._where.keys() | self._overlay.keys())


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_state_dict(path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    allow_pickle: bool = False, prefix: str = "model") -> MutableMapping[str, torch.Tensor]:
    """All tensors of a checkpoint, floating ones cast to `dtype`, on `device`. Safetensors
    are read lazily (see LazyStateDict); pickles (only when allowed) are read whole."""
    files = weight_files(path, prefix=prefix, allow_pickle=allow_pickle)
    if files[0].suffix == ".safetensors":
        return LazyStateDict(files, device, dtype)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = torch.load(file, map_location=device, weights_only=True)
        state.update({k: _cast(v, dtype) for k, v in part.items()})
    return state


def _take(dest: torch.Tensor, tensor: torch.Tensor, take: bool) -> None:
    """Puts `tensor`'s values into the module's `dest`. With `take`, a checkpoint tensor already
    in the module's dtype, on its device and contiguous becomes the module's storage (no copy:
    the load never holds the model twice); any other is copied into `dest`'s own storage.
    Safetensors' tensors are views of the file's mapping: taking them would leave the model
    reading a file that a rewrite in place (save_pretrained truncates) turns into SIGBUS, so
    the loader takes only tensors it owns (checkpoints/loader.py)."""
    dense = tensor.is_contiguous() or (tensor.dim() == 2 and tensor.t().is_contiguous())  # column-major too
    if take and tensor.dtype == dest.dtype and tensor.device == dest.device and dense and not tensor.requires_grad:
        dest.data = tensor
    else:
        dest.copy_(tensor)


def assign(module: nn.Module, state: Mapping[str, torch.Tensor], *,
           rename: Callable[[str], str | None] = lambda name: name,
           ignore_missing: Iterable[str] = (), tied: Mapping[str, str] | None = None, take: bool = False) -> None:
    """Puts checkpoint tensors into `module` by name, strictly (see _take: taken, not copied, where they fit).

    rename: checkpoint name -> our parameter name, or None to skip the tensor.
    ignore_missing: our names that a checkpoint may lack (buffers we compute ourselves).
    tied: our name -> our name it shares storage with when the checkpoint omits it.
    take: the tensors are the caller's own (not views of a file someone may rewrite): see _take.
    """
    ours = dict(module.state_dict(keep_vars=True))
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
            _take(dest, tensor, take)
            seen.add(target)
        for name, source in (tied or {}).items():
            if name not in seen and source in seen:
                if ours[name] is not ours[source]:  # tie_weights made them one Parameter already
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
        if tensor.is_mkldnn:  # a prepacked weight (layers/packed_linear.py) has no storage to ask
            total += tensor.numel() * tensor.element_size()
            continue
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def module_device(module: nn.Module) -> torch.device:
    """Where a module's first parameter or buffer lives (a packed linear has only a buffer)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Random initialisation of meta tensors becomes a no-op. It computes nothing there, but
    normal_'s meta kernel (nn.Embedding's init) imports torch._dynamo on its first call: 1-2 s
    of a server's start (issue #16). A function mode is per thread, so a model built
    elsewhere meanwhile still initialises."""

    # nn.init's functions dispatch to a mode themselves (and call the tensor methods with the
    # modes off), so both levels are listed.
    _RANDOM_INIT = frozenset({
        torch.Tensor.normal_, torch.Tensor.uniform_,
        *(getattr(nn.init, name) for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_normal_",
                                              "kaiming_uniform_", "xavier_normal_", "xavier_uniform_",
                                              "orthogonal_", "sparse_")),
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._RANDOM_INIT:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _give_storage(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Module.to_empty(device).to(dtype) without their cost: to_empty's empty_like on meta
    tensors imports torch.fx's symbolic shapes and sympy on first use (1-1.5 s and ~40 MiB of a
    server's start, issue #16). Floating tensors get `dtype`, others keep theirs; a tensor
    shared by several modules (a tied head) stays shared."""
    made: dict[int, torch.Tensor] = {}

    def real(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            empty = torch.empty(tensor.shape, device=device,
                                dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            made[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else empty)
        return made[id(tensor)]

    for sub in module.modules():
        for slots in (sub._parameters, sub._buffers):
            for name, tensor in slots.items():
                if tensor is not None:
                    slots[name] = real(tensor)


def empty_module(factory: Callable[[], nn.Module], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Builds a module without random initialisation (weights come from the checkpoint next).

    Built on the meta device with the initialisers skipped, then given real but uninitialised
    storage on `device`. Buffers that the checkpoint does not carry (position tables, masks)
    are recomputed by the module's `init_buffers()` where it has one.
    """
    with torch.device("meta"), _SkipRandomInitOnMeta():
        module = factory()
    _give_storage(module, torch.device(device), dtype)
    for sub in module.modules():
        init = getattr(sub, "init_buffers", None)
        if callable(init):
            init()
    return module.eval()
