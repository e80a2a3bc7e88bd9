"""OpenAI request fields -> checked Python values and pipeserve.v1 options. Every number is
range-checked here, before it reaches a request (the services check them again)."""
from __future__ import annotations

from typing import Any

from .errors import invalid

# OpenAI's default max_tokens for /v1/completions.
DEFAULT_COMPLETION_TOKENS = 16


def boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid(f"{name} must be true or false", name)


def number(body: dict, name: str, kind: type, low: float, high: float):
    """An optional number field, checked against its range before it is used; None when absent."""
    value = body.get(name)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise invalid(f"{name} must be a{'n integer' if kind is int else ' number'}", name) from None
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}", name)
    return value


def string(body: dict, name: str, default: str = "") -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name)
    return value


def generation_options(body: dict, *, chat_api: bool):
    from pipeserve.v1 import text_generation_pb2 as pb

    # OpenAI answers with the completion alone; `echo` (completions only) puts the prompt first.
    options = pb.GenerationOptions(return_full_text=False if chat_api else boolean(body.get("echo", False), "echo"))
    max_tokens = number(body, "max_completion_tokens" if chat_api and "max_completion_tokens" in body
                         else "max_tokens", int, 1, 1 << 20)
    if max_tokens is not None:
        options.max_new_tokens = max_tokens
    elif not chat_api:
        options.max_new_tokens = DEFAULT_COMPLETION_TOKENS
    temperature = number(body, "temperature", float, 0.0, 2.0)
    if temperature is not None:
        # OpenAI's temperature 0 is greedy decoding; above it, sampling at that temperature.
        options.do_sample = temperature > 0
        if temperature > 0:
            options.temperature = temperature
    top_p = number(body, "top_p", float, 0.0, 1.0)
    if top_p is not None:
        options.top_p = top_p
    seed = number(body, "seed", int, 0, (1 << 64) - 1)
    if seed is not None:
        options.seed = seed
    n = number(body, "n", int, 1, 128)
    if n is not None:
        options.num_return_sequences = n
    # Beyond OpenAI's fields, the ones vLLM's OpenAI-compatible server also takes (same names).
    top_k = number(body, "top_k", int, 0, 1 << 20)
    if top_k is not None:
        options.top_k = top_k
    min_tokens = number(body, "min_tokens", int, 0, 1 << 20)
    if min_tokens is not None:
        options.min_new_tokens = min_tokens
    repetition_penalty = number(body, "repetition_penalty", float, 0.01, 100.0)
    if repetition_penalty is not None:
        options.repetition_penalty = repetition_penalty
    if body.get("ignore_eos") is not None:
        options.ignore_eos = boolean(body["ignore_eos"], "ignore_eos")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise invalid("stop must be a string or a list of at most 4 strings", "stop")
        options.stop.extend(stop)
    return options
