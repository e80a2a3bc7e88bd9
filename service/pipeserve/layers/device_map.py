"""device_map="auto": spread a decoder's layers over the visible GPUs, then CPU, by free memory.

The plan is a pure function of byte counts (so it is tested with made-up memory numbers);
`dispatch` measures the model and the devices and moves the modules. The embedding, final norm
and output projection (the "head", shared storage when tied) stay together on the first device
that has room, and the layers follow in order, each device filled up to its budget before the
next is used. The forward pass moves the hidden state between devices (models/causal_lm.run_layers)
and the KV cache puts each layer's keys and values on that layer's device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadFailed

# Fraction of a device's free memory left for the KV cache, activations and allocator slack.
RESERVE_FRACTION = 0.2


@dataclass(frozen=True)
class DeviceMap:
    head: str
    layers: list[str]


def plan_device_map(head_bytes: int, layer_bytes: list[int], free: list[tuple[str, int]],
                    reserve_fraction: float = RESERVE_FRACTION) -> DeviceMap:
    """free: (device, free bytes) in preference order (GPUs first, CPU last)."""
    budgets = [[device, int(bytes_ * (1 - reserve_fraction))] for device, bytes_ in free]
    if not budgets:
        raise ModelLoadFailed("no device to place the model on", reason="DEVICE_MAP")
    head = next((b for b in budgets if b[1] >= head_bytes), None)
    if head is None:
        raise ModelLoadFailed(f"no device has room for the embeddings and output layer ({head_bytes} bytes)",
                              reason="DEVICE_MAP")
    head[1] -= head_bytes
    placement: list[str] = []
    current = 0
    for index, size in enumerate(layer_bytes):
        while current < len(budgets) and budgets[current][1] < size:
            current += 1
        if current == len(budgets):
            raise ModelLoadFailed(f"layer {index} ({size} bytes) does not fit in the free memory of "
                                  f"{[d for d, _ in free]}", reason="DEVICE_MAP")
        budgets[current][1] -= size
        placement.append(budgets[current][0])
    return DeviceMap(head[0], placement)


def free_memory() -> list[tuple[str, int]]:
    """Free bytes per visible GPU, then available CPU memory."""
    devices: list[tuple[str, int]] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            devices.append((f"cuda:{index}", free))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 1 << 40
    devices.append(("cpu", available))
    return devices


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelLoadFailed("device_map auto needs a model with a list of decoder layers", reason="DEVICE_MAP")
    return max(lists, key=len)


def dispatch(model: nn.Module, free: list[tuple[str, int]] | None = None) -> DeviceMap:
    """Plans and applies the device map; sets model.layer_devices for the forward pass and cache."""
    layers = decoder_layers(model)
    layer_bytes = [_bytes(layer) for layer in layers]
    plan = plan_device_map(_bytes(model) - sum(layer_bytes), layer_bytes, free if free is not None else free_memory())
    layer_ids = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    head = torch.device(plan.head)
    inside = {id(m) for layer in layers for m in layer.modules()}
    for module in model.modules():  # the head: every tensor not inside a decoder layer
        if id(module) in inside:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in layer_ids:
                param.data = param.data.to(head)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in layer_ids:
                setattr(module, name, buf.to(head))
    for layer, device in zip(layers, plan.layers):
        layer.to(device)
    model.layer_devices = [torch.device(d) for d in plan.layers]
    return plan
