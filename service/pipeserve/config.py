"""Server settings: defaults < config file (TOML) < environment (PIPESERVE_*) < command-line flags.

Each setting is a typed field of `Settings`. The field's type decides how text from a flag or
an environment variable is read (and which TOML values are accepted); `RULES` gives each field
its --help description and, where needed, one constraint (a range, a set of choices). Fields
without a rule still get their type checked, and numbers must be >= 0. A value that cannot be
read, or breaks its rule, is a `ConfigError` naming the setting and where it came from (flag,
environment variable, TOML key); the server prints it as one line and exits with status 2.
Unknown TOML keys and unknown flags are errors; unknown PIPESERVE_* variables are warnings
(the same environment often carries the client's PIPESERVE_TOKEN, the image's healthcheck
variables, or Kubernetes' PIPESERVE_PORT for a Service named pipeserve).

Longer than 450 lines: the table of every setting (type, --help, rule) is one list so that adding a
setting touches one place; reading flags, environment and TOML should split out next.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    load_in_8bit: bool | None = None  # None: the source's default (LoadOptions)
    # "float16": float16 weights under a float32 model (LoadOptions.weights_dtype); None: as dtype.
    weights_dtype: str | None = None
    # "none", "int8" or "grouped" (LoadOptions.quantization); None: load_in_8bit, else the source's default.
    quantization: str | None = None
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
    # C heap blocks this large or larger are mapped and unmapped, so their pages leave when
    # freed (runtime/heap.limit_heap_slack); 0 = glibc's adaptive threshold.
    heap_mmap_threshold_bytes: int = 256 * 1024
    # ...while the compute lanes work: freed activations stay on the heap for the next pass
    # (runtime/manager.py); 0 = heap_mmap_threshold_bytes throughout.
    heap_mmap_threshold_busy_bytes: int = 32 * MiB
    # Before and after each model load, code pages only start-up and loading ran leave the
    # resident set (runtime/code_pages.py); false keeps them until the kernel reclaims them.
    release_code_pages: bool = True
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
    # Every URI fetch ends within this many seconds (or the call's deadline, if sooner), and at
    # most this many run at once on their own workers; more are refused with QUEUE_FULL.
    uri_fetch_timeout_s: float = 30.0
    uri_fetch_concurrency: int = 16
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold (0.25 GiB of RGBA / 3).
    max_audio_seconds: float = 4 * 3600.0
    # Longest text-generation prompt in tokens; 0 = each model's context is the bound.
    max_prompt_tokens: int = 0
    max_queue: int = 256
    max_batch_size: int = 8
    max_batch_wait_ms: float = 5.0
    # CPU model work on compute lanes (pipeserve.scheduling.compute): torch's OpenMP runtime slows every
    # operator once several threads run parallel ones. One lane gives each operator all cores
    # (large models); N lanes run N calls at once on cores/N threads each (small models).
    # Off: each caller's thread computes. Only when the default device is the CPU.
    compute_lane: bool = True
    compute_lanes: int = 1
    # Continuous batching for text generation: sequences decoding together, and the tokens
    # (prompt + max_new_tokens) they may reserve in the key/value cache.
    generation_max_batch_size: int = 32
    generation_max_batch_tokens: int = 65536
    # Speech recognition: per model, the Whisper windows of concurrent calls decoding together,
    # and the calls running at once (more wait in max_queue).
    asr_max_batch_rows: int = 16
    hub_offline: bool = False
    # Observability (pipeserve.serving.metrics / observability): Prometheus HTTP endpoint ("host:port";
    # empty = off), log format ("text" or "json") and level ("debug" logs every call, "info"
    # the failed ones), one OpenTelemetry span per RPC when opentelemetry is installed and on.
    metrics_listen: str = ""
    # OpenAI-compatible HTTP/JSON endpoints (pipeserve.http), "host:port"; empty = off. Served
    # by this process through its own gRPC services, so auth, limits and metrics are the same.
    http_listen: str = ""
    log_format: str = "text"
    log_level: str = "info"
    tracing: bool = False
    # Security (pipeserve.serving.security): PEM files for TLS; a client CA turns on mutual TLS.
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


class ConfigError(ValueError):
    """A setting that cannot be used: one line naming the setting and where it came from."""


# ---- rules: a description (the --help text) and at most one constraint per setting ------------

# What a constraint returns: what is wrong with a value, or None.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Rule:
    help: str
    check: Check | None = None


def one_of(*allowed: str) -> Check:
    return lambda value: None if value in allowed else f"must be one of {', '.join(allowed)}"


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def above(minimum: float) -> Check:
    return lambda value: None if value > minimum else f"must be > {minimum}"


def between(low: float, high: float) -> Check:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def address(allow_empty: bool = False) -> Check:
    """HOST:PORT (IPv6 as [::]:PORT; port 0 asks for a free one), or unix:PATH."""
    def check(value: str) -> str | None:
        if (allow_empty and value == "") or value.startswith(("unix:", "unix-abstract:")):
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            return "must be HOST:PORT with a port from 0 to 65535"
        return None
    return check


def host_entries() -> Check:
    """Allowlist entries: "host", "host:port" or "[IPv6]:port"; not URLs, not wildcards."""
    def check(entries: tuple[str, ...]) -> str | None:
        for entry in entries:
            host, port = entry, ""
            if entry.startswith("["):
                host, _, rest = entry[1:].partition("]")
                if rest and not rest.startswith(":"):
                    host = ""
                port = rest[1:]
            elif entry.count(":") == 1:
                host, _, port = entry.partition(":")
            bad_port = (entry.count(":") == 1 or port) and not (port.isdigit() and 1 <= int(port) <= 65535)
            if not host or any(c in host for c in "/@*?# ") or bad_port:
                return f"has {entry!r}: entries are host or host:port (port 1-65535), not URLs or patterns"
        return None
    return check


def device() -> Check:
    def check(value: str) -> str | None:
        from .devices import device_problem  # imports torch only for non-CPU names

        return device_problem(value)
    return check


DTYPE_NAMES = ("float32", "float16", "bfloat16", "fp32", "fp16", "half", "bf16")

RULES: dict[str, Rule] = {
    "listen": Rule("address the gRPC server listens on, HOST:PORT (port 0: a free port)", address()),
    "embedded_defaults": Rule("load the packaged real-weight default models for tasks that --preload does not name"),
    "device": Rule("default device for models: cpu, cuda, cuda:N, mps, or auto (text generation spreads layers "
                   "over the GPUs, then CPU)", device()),
    "dtype": Rule("default weight dtype: float32, float16 or bfloat16", one_of(*DTYPE_NAMES)),
    "heap_mmap_threshold_bytes": Rule("C heap blocks of this many bytes or more are mapped, so the pages of "
                                      "freed activations go back to the system; 0 = glibc's adaptive "
                                      "threshold (faster by the page faults, up to ~90 MiB more resident)",
                                      between(0, 1 << 30)),
    "heap_mmap_threshold_busy_bytes": Rule("the same threshold while the compute lanes work (freed activations "
                                           "stay on the heap for the next pass, saving their page faults: "
                                           "~14 % of a transcription's CPU time); heap_mmap_threshold_bytes comes "
                                           "back and the free pages go once the lanes have been idle 1 s; 0 = "
                                           "heap_mmap_threshold_bytes throughout", between(0, 1 << 30)),
    "release_code_pages": Rule("before and after each model load, drop the code pages that only start-up and "
                               "loading ran from the resident set (madvise; pages that run again come back from "
                               "the page cache): ~60 MiB less VmRSS on the speech-only server"),
    "memory_budget_bytes": Rule("bytes of model weights allowed resident per device (idle models are evicted "
                                "to make room); 0 = unlimited"),
    "max_message_bytes": Rule("largest gRPC message received or sent, in bytes; also the URI fetch size limit",
                              at_least(1024)),
    "keepalive_time_s": Rule("seconds between keepalive pings on idle connections", above(0)),
    "keepalive_timeout_s": Rule("seconds to wait for a keepalive ping's answer before closing", above(0)),
    "grace_period_s": Rule("seconds calls in flight get to finish after SIGTERM"),
    "allow_pickle": Rule("allow pickle checkpoints (.bin/.pt; weights-only unpickling); a ceiling no request "
                         "can raise"),
    "uri_http_hosts": Rule("comma-separated hosts that http(s) URI inputs may come from: 'host' allows the "
                           "scheme's default port only, 'host:port' that port only; empty = off",
                           host_entries()),
    "uri_file_root": Rule("directory that file:// URI inputs may read under; empty = off"),
    "uri_fetch_timeout_s": Rule("seconds a URI fetch may take in all (connect, headers, body); a call's sooner "
                                "deadline wins", above(0)),
    "uri_fetch_concurrency": Rule("URI fetches running at once, on their own workers; more are refused with "
                                  "QUEUE_FULL", between(1, 1024)),
    "max_image_pixels": Rule("largest decoded image, in pixels (decompression-bomb guard)", at_least(1)),
    "max_audio_seconds": Rule("longest decoded audio input, in seconds", above(0)),
    "max_prompt_tokens": Rule("longest text-generation prompt, in tokens; 0 = each model's context"),
    "max_queue": Rule("calls waiting per task before new ones are refused with QUEUE_FULL", at_least(1)),
    "max_batch_size": Rule("most requests the batcher runs in one forward pass", at_least(1)),
    "max_batch_wait_ms": Rule("milliseconds a batch waits for company while another batch of its model runs "
                              "(a call to an idle model runs at once)"),
    "compute_lane": Rule("run CPU model work on compute lanes (one OpenMP team per lane) instead of each "
                         "caller's thread"),
    "compute_lanes": Rule("CPU compute lanes; N lanes run N calls at once on cores/N threads each", between(1, 256)),
    "generation_max_batch_size": Rule("text-generation sequences decoding together", at_least(1)),
    "generation_max_batch_tokens": Rule("tokens (prompt + max_new_tokens) the sequences decoding together may "
                                        "reserve in the key/value cache", at_least(1)),
    "asr_max_batch_rows": Rule("speech-recognition calls running at once per model; their Whisper windows "
                               "decode together, at most this many per step", between(1, 256)),
    "hub_offline": Rule("never contact the Hugging Face Hub: Hub ids resolve from the local cache only"),
    "metrics_listen": Rule("Prometheus /metrics HTTP address, HOST:PORT; empty = off", address(allow_empty=True)),
    "http_listen": Rule("OpenAI-compatible HTTP/JSON address (/v1/audio/transcriptions, /v1/embeddings, "
                        "/v1/completions, /v1/chat/completions, /v1/models, /healthz, /readyz), HOST:PORT "
                        "(port 0: a free port); empty = off", address(allow_empty=True)),
    "log_format": Rule("log format: text or json", one_of("text", "json")),
    "log_level": Rule("log level: debug (every call), info (failed calls), warning, error or critical",
                      one_of("debug", "info", "warning", "error", "critical")),
    "tracing": Rule("one OpenTelemetry span per call (needs opentelemetry installed)"),
    "tls_cert": Rule("PEM certificate chain for TLS; with tls_key turns TLS on"),
    "tls_key": Rule("PEM private key for TLS"),
    "tls_client_ca": Rule("PEM CA that client certificates must chain to (mutual TLS)"),
    "auth_tokens": Rule("comma-separated bearer tokens that may call tasks and read models ('file:PATH' reads "
                        "one per line); empty with admin_tokens empty = no auth"),
    "admin_tokens": Rule("comma-separated bearer tokens that may also load and unload models ('file:PATH' reads "
                         "one per line)"),
    "max_streams_per_client": Rule("concurrent streaming calls one client (token, else address) may hold; "
                                   "0 = no limit"),
    # Apply once the model-loading policy's fields exist; rules for absent fields are ignored.
    "on_demand_loading": Rule("which models an ordinary call may load by naming them: off, local (directories "
                              "under model_root) or any (also Hub ids); with auth on, only admin tokens may",
                              one_of("off", "local", "any")),
    "model_root": Rule("directory that on-demand loading may load local models from"),
}


# ---- reading values by the field's type -------------------------------------------------------

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NOT_SETTINGS = ("CONFIG", "PRELOAD", "TOKEN", "SERVER", "TESSERACT", "PYTHON")  # read elsewhere
_NOT_SETTING_PREFIXES = ("HEALTHCHECK_",)


def _fields() -> dict[str, Any]:
    """Setting name -> its type, for every field read from flags, env and TOML."""
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings) if f.name != "preload"}


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def read_value(tp: Any, raw: Any, from_text: bool) -> Any:
    """`raw` (text from a flag/env var, or a TOML value) as type `tp`; ValueError says why not."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw == "" else read_value(inner, raw, from_text)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if raw not in allowed:
            raise ValueError(f"{_shown(raw)} must be one of {', '.join(map(str, allowed))}")
        return raw
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"{_shown(raw)} is not a boolean (use true/false, 1/0, yes/no or on/off)")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text:
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"{_shown(raw)} is not an integer")
    if tp is float:
        value: float | None = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif from_text:
            try:
                value = float(raw.strip())
            except ValueError:
                pass
        if value is None or not math.isfinite(value):
            raise ValueError(f"{_shown(raw)} is not a finite number")
        return value
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"{_shown(raw)} is not a string")
    if origin is tuple:
        if isinstance(raw, str):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return tuple(x.strip() for x in raw if x.strip())
        raise ValueError(f"{_shown(raw)} is not a list of strings")
    raise ValueError(f"settings of type {tp} cannot be given here")


def _problem(name: str, tp: Any, value: Any) -> str | None:
    """What breaks the setting's rule (or, without one, the >= 0 every number must meet)."""
    rule = RULES.get(name)
    if rule is not None and rule.check is not None:
        return rule.check(value) if value is not None else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return "must be >= 0"
    return None


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# ---- preloads ---------------------------------------------------------------------------------

_SPEC_KEYS = {"model": str, "revision": str, "device": str, "dtype": str, "load_in_8bit": bool,
              "weights_dtype": str, "quantization": str, "options": dict}
# Weights stored narrower than they compute: float16 under a float32 model (layers/half_storage.py).
WEIGHTS_DTYPE_NAMES = ("float32", "float16", "fp32", "fp16", "half")
# The weights' quantized forms (LoadOptions.quantization): float, int8 per output channel, groups
# of 32 on grids of up to 256 levels (layers/grid_int4.py).
QUANTIZATIONS = ("none", "int8", "grouped")


def chosen_quantization(quantization: str | None, load_in_8bit: bool | None) -> str | None:
    """The form a load asks for: `quantization` where set, else "int8" or "none" as load_in_8bit
    says; None when neither is set (the source decides). ValueError for an unknown form, or one
    that load_in_8bit contradicts."""
    if quantization is None:
        return None if load_in_8bit is None else ("int8" if load_in_8bit else "none")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if load_in_8bit is not None and load_in_8bit != (quantization == "int8"):
        raise ValueError(f"quantization {quantization} and load_in_8bit {str(load_in_8bit).lower()} contradict each "
                         "other: set one of them")
    return quantization


def _parse_preload(entries: dict[str, tuple[Any, str]]) -> dict[str, ModelSpec]:
    """task -> (model name or spec table, where it came from) -> validated specs."""
    specs = {}
    for task_name, (value, source) in entries.items():
        label = f"{source} [preload] {task_name}" if source.startswith("config") else source
        try:
            task = Task.parse(task_name).value
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        if isinstance(value, str):
            value = {"model": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a model name or a table with model, revision, device, dtype, "
                              f"weights_dtype, load_in_8bit, quantization, options")
        for key, item in value.items():
            if key not in _SPEC_KEYS:
                raise ConfigError(f"{label}: unknown key {key!r}{_did_you_mean(key, list(_SPEC_KEYS))}; "
                                  f"known: {', '.join(_SPEC_KEYS)}")
            if not isinstance(item, _SPEC_KEYS[key]):
                raise ConfigError(f"{label}.{key}: {_shown(item)} is not a {_SPEC_KEYS[key].__name__}")
        if not value.get("model", "").strip():
            raise ConfigError(f"{label}: needs a model (a local directory or a Hub id)")
        for key, check in (("device", device()), ("dtype", one_of(*DTYPE_NAMES)),
                           ("weights_dtype", one_of(*WEIGHTS_DTYPE_NAMES))):
            problem = check(value[key]) if key in value else None
            if problem:
                raise ConfigError(f"{label}.{key}: {_shown(value[key])} {problem}")
        try:
            chosen_quantization(value.get("quantization"), value.get("load_in_8bit"))
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        specs[task] = ModelSpec(**{**value, "task": task})
    return specs


def _preload_pairs(items: list[str], source: str) -> dict[str, tuple[str, str]]:
    """`TASK=MODEL` pairs (flags, or PIPESERVE_PRELOAD separated by ';')."""
    out = {}
    for item in items:
        task, sep, model = item.partition("=")
        if not sep or not task.strip() or not model.strip():
            raise ConfigError(f"{source}: expected TASK=MODEL, got {_shown(item)}")
        out[task.strip()] = (model.strip(), source)
    return out


# ---- the command line -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see --help)")


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if value is None or value == "":
        return "empty"
    return str(value)


def _metavar(tp: Any) -> str:
    tp = _optional_inner(tp) or tp
    if tp is bool:
        return "BOOL"
    if tp is int:
        return "INT"
    if tp is float:
        return "NUMBER"
    if typing.get_origin(tp) is tuple:
        return "LIST"
    return "TEXT"


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    environ = os.environ if environ is None else environ
    parser = _Parser(prog="pipeserve-server", allow_abbrev=False,
                     description="pipeserve gRPC server. Settings come from defaults < a TOML file (--config) < "
                                 "PIPESERVE_<NAME> environment variables < these flags.")
    parser.add_argument("--version", action="version", version=f"pipeserve {__version__}")
    parser.add_argument("--config", default=environ.get("PIPESERVE_CONFIG"), metavar="FILE",
                        help="TOML settings file: keys are the setting names with underscores; a [preload] table "
                             "maps task = \"model\" or task = {model, revision, device, dtype, weights_dtype, "
                             "load_in_8bit, quantization, options} [env PIPESERVE_CONFIG]")
    parser.add_argument("--preload", action="append", default=[], metavar="TASK=MODEL",
                        help="preload MODEL (local directory or Hub id) as TASK's default; repeatable "
                             "[env PIPESERVE_PRELOAD, pairs separated by ';']")
    defaults = Settings()
    for name, tp in _fields().items():
        rule = RULES.get(name, Rule("(no description)"))
        text = (f"{rule.help} [default: {_default_text(getattr(defaults, name))}; "
                f"env PIPESERVE_{name.upper()}]").replace("%", "%%")
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if tp is bool else {}
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=_metavar(tp),
                            help=text, **extra)
    return parser


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None,
                  warn: Callable[[str], None] | None = None) -> Settings:
    """Settings from defaults, the TOML file, PIPESERVE_* variables and flags. Raises
    ConfigError (one line naming the setting and its source) for anything it cannot use."""
    environ = dict(os.environ if environ is None else environ)
    warn = warn or (lambda message: print(f"pipeserve-server: warning: {message}", file=sys.stderr))
    fields = _fields()
    args = build_parser(environ).parse_args(argv)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    preload: dict[str, tuple[Any, str]] = {}

    def put(name: str, raw: Any, source: str, from_text: bool) -> None:
        try:
            values[name] = read_value(fields[name], raw, from_text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        sources[name] = source

    if args.config:
        where = f"config file {args.config}"
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        table = data.pop("preload", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: preload must be a table of task = model")
        preload.update({task: (spec, where) for task, spec in table.items()})
        for key, raw in data.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown setting {key!r}{_did_you_mean(key, list(fields))}")
            put(key, raw, f"{where}: {key}", from_text=False)

    env_names = {"PIPESERVE_" + name.upper(): name for name in fields}
    for variable, raw in sorted(environ.items()):
        if not variable.startswith("PIPESERVE_"):
            continue
        if variable in env_names:
            put(env_names[variable], raw, variable, from_text=True)
            continue
        rest = variable.removeprefix("PIPESERVE_")
        if rest not in _NOT_SETTINGS and not rest.startswith(_NOT_SETTING_PREFIXES):
            warn(f"{variable} is not a setting, ignored{_did_you_mean(variable, list(env_names))}")
    if environ.get("PIPESERVE_PRELOAD"):
        preload.update(_preload_pairs([p for p in environ["PIPESERVE_PRELOAD"].split(";") if p.strip()],
                                      "PIPESERVE_PRELOAD"))

    for name in fields:
        raw = getattr(args, name)
        if raw is not None:
            put(name, raw, "--" + name.replace("_", "-"), from_text=True)
    preload.update(_preload_pairs(args.preload, "--preload"))

    for name, value in values.items():
        problem = _problem(name, fields[name], value)
        if problem:
            raise ConfigError(f"{sources[name]}: {_shown(value)} {problem}")
    return Settings(preload=_parse_preload(preload), **values)
