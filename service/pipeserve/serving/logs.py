"""Logging: plain text for a terminal, or one JSON object per line for log collectors; every
record carries the id of the request being handled (set per RPC by the telemetry interceptor
from the request's `request_id` field or `x-request-id` metadata) and, when tracing is on, the
OpenTelemetry trace and span ids of its span (set by tracing.rpc_span), so a log line can be
found from a trace and the other way round."""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from contextvars import ContextVar

from ..bounds import MAX_LOG_MESSAGE_CHARS, MAX_LOG_VALUE_CHARS, for_log, shorten

# The request being handled on this asyncio task ("" outside an RPC).
request_id_var: ContextVar[str] = ContextVar("pipeserve_request_id", default="")
# (trace_id, span_id) of the RPC's span as W3C hex (32 and 16 digits); None without tracing.
trace_ids_var: ContextVar[tuple[str, str] | None] = ContextVar("pipeserve_trace_ids", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id",
                                                                         "trace"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id and, inside a traced RPC, its trace_id
    and span_id (a filter on the handler, so records of every logger get them, including
    grpc's and torch's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        ids = trace_ids_var.get()
        if ids is not None and not getattr(record, "trace_id", ""):
            record.trace_id, record.span_id = ids
        return True


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", "request_id", ...extra fields, "exception"}; the
    message, every string field and the exception are bounded (they may quote a client)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": shorten(record.getMessage(), MAX_LOG_MESSAGE_CHARS),
            "request_id": getattr(record, "request_id", "") or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                value = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                out[key] = shorten(value, MAX_LOG_VALUE_CHARS) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = bounded_traceback(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with the message and the exception bounded (they may quote a client), and
    the message's control characters escaped: one record is one line, whatever a name holds."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = for_log(record.message, MAX_LOG_MESSAGE_CHARS)
        trace_id = getattr(record, "trace_id", "")
        record.trace = f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}" if trace_id else ""
        return super().formatMessage(record)

    def formatException(self, exc_info) -> str:
        return bounded_traceback(super().formatException(exc_info))


def bounded_traceback(text: str) -> str:
    """A formatted exception with each line and the whole bounded: its frames are server code,
    but its message (and a chained one) may quote a client's string."""
    lines = [shorten(line, MAX_LOG_VALUE_CHARS * 2) for line in text.splitlines()]
    return shorten("\n".join(lines), MAX_LOG_EXCEPTION_CHARS)


# `trace` is " trace_id=... span_id=..." inside a traced RPC, else empty (TextFormatter sets it).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s%(trace)s]: %(message)s"
# A traceback is server code plus, in its last line, a message that may quote a client.
MAX_LOG_EXCEPTION_CHARS = 8192


def configure_logging(fmt: str = "text", level: int | str = logging.INFO, stream=None) -> logging.Handler:
    """Replaces the root handlers with one that writes `fmt` ("text" or "json") to `stream` (stderr)."""
    if fmt not in ("text", "json"):
        raise SystemExit(f"log_format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
