"""Server settings: defaults < config file (TOML) < environment (PIPESERVE_*) < command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import Task

MiB = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """One model to preload: a reference (local dir or Hub id) and how to place it."""

    model: str
    task: str | None = None
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    load_in_8bit: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    # task name -> model spec preloaded at start and used when a request names no model.
    preload: dict[str, ModelSpec] = field(default_factory=dict)
    # Load the embedded defaults (packaged real weights) for tasks `preload` does not name.
    embedded_defaults: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    # Bytes of model weights allowed resident per device; 0 = unlimited.
    memory_budget_bytes: int = 0
    max_message_bytes: int = 64 * MiB
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    grace_period_s: float = 10.0
    # A ceiling: LoadModel may ask for pickle checkpoints only when this is on.
    allow_pickle: bool = False
    # Whether a task call naming a model that is not resident loads it (as pipeline(model=...)
    # does): "off" (only LoadModel and the preloads decide what is loaded), "local" (also
    # directories under `model_root` and "embedded/..." names), "any" (also other local
    # directories and Hub ids, which may download). With auth on, it also needs an admin token.
    on_demand_loading: str = "off"
    # Directory every local model path requested over the API (LoadModel, on-demand loading)
    # must lie inside, after resolving symlinks; "" = no such bound. Preloads are exempt.
    model_root: str = ""
    # URI inputs: both off by default (no SSRF, no path traversal).
    uri_http_hosts: tuple[str, ...] = ()
    uri_file_root: str | None = None
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold (0.25 GiB of RGBA / 3).
    max_audio_seconds: float = 4 * 3600.0
    # Longest text-generation prompt in tokens; 0 = each model's context is the bound.
    max_prompt_tokens: int = 0
    max_queue: int = 256
    max_batch_size: int = 8
    max_batch_wait_ms: float = 5.0
    # CPU model work on compute lanes (pipeserve.compute): torch's OpenMP runtime slows every
    # operator once several threads run parallel ones. One lane gives each operator all cores
    # (large models); N lanes run N calls at once on cores/N threads each (small models).
    # Off: each caller's thread computes. Only when the default device is the CPU.
    compute_lane: bool = True
    compute_lanes: int = 1
    # Continuous batching for text generation: sequences decoding together, and the tokens
    # (prompt + max_new_tokens) they may reserve in the key/value cache.
    generation_max_batch_size: int = 32
    generation_max_batch_tokens: int = 65536
    hub_offline: bool = False
    # Observability (pipeserve.metrics / observability): Prometheus HTTP endpoint ("host:port";
    # empty = off), log format ("text" or "json") and level ("debug" logs every call, "info"
    # the failed ones), one OpenTelemetry span per RPC when opentelemetry is installed and on.
    metrics_listen: str = ""
    log_format: str = "text"
    log_level: str = "info"
    tracing: bool = False
    # Security (pipeserve.security): PEM files for TLS; a client CA turns on mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer tokens allowed to call tasks and read models; admin tokens may also load and
    # unload. An entry "file:PATH" reads tokens from a file, one per line. Both empty = no auth.
    auth_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    # Concurrent streaming calls one client (its token, else its address) may hold; 0 = no limit.
    max_streams_per_client: int = 16

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: Any) -> Any:
    """Turns strings from env/flags into the field's type."""
    default = getattr(Settings(), name)
    if isinstance(raw, str):
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
    if isinstance(default, tuple) and isinstance(raw, list):
        return tuple(raw)
    return raw


def _parse_preload(entries: dict[str, Any]) -> dict[str, ModelSpec]:
    specs = {}
    for task_name, value in entries.items():
        task = Task.parse(task_name).value
        spec = ModelSpec(model=value) if isinstance(value, str) else ModelSpec(**value)
        specs[task] = dataclasses.replace(spec, task=task)
    return specs


def _parse_preload_flag(items: list[str]) -> dict[str, Any]:
    """`--preload task=model` pairs."""
    out = {}
    for item in items:
        task, sep, model = item.partition("=")
        if not sep:
            raise SystemExit(f"--preload expects TASK=MODEL, got {item!r}")
        out[task] = model
    return out


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="pipeserve-server", description="pipeserve gRPC server")
    parser.add_argument("--config", help="TOML settings file", default=environ.get("PIPESERVE_CONFIG"))
    parser.add_argument("--preload", action="append", default=[], metavar="TASK=MODEL")
    for f in dataclasses.fields(Settings):
        if f.name == "preload":
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    preload: dict[str, Any] = {}
    if args.config:
        data = tomllib.loads(Path(args.config).read_text())
        preload.update(data.pop("preload", {}))
        values.update({k: _coerce(k, v) for k, v in data.items()})
    names = {f.name for f in dataclasses.fields(Settings)} - {"preload"}
    for name in names:
        env = environ.get("PIPESERVE_" + name.upper())
        if env is not None:
            values[name] = _coerce(name, env)
    if environ.get("PIPESERVE_PRELOAD"):
        preload.update(_parse_preload_flag(environ["PIPESERVE_PRELOAD"].split(";")))
    for name in names:
        flag = getattr(args, name)
        if flag is not None:
            values[name] = _coerce(name, flag)
    preload.update(_parse_preload_flag(args.preload))
    unknown = set(values) - names
    if unknown:
        raise SystemExit(f"unknown settings: {sorted(unknown)}")
    return Settings(preload=_parse_preload(preload), **values)
