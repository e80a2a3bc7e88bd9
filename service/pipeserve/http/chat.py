"""Chat messages -> a prompt, with the model's own chat template (tokenizer_config.json's
`chat_template`, Jinja as in transformers' apply_chat_template), rendered in Jinja's
immutable sandbox: a template may not reach Python objects or change its inputs. A model
without a template cannot take chat messages (400 NO_CHAT_TEMPLATE): guessing a format would
produce text the model was never trained on."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import HttpError, invalid

# tokenizer_config.json files are a few KiB; a bigger one is not read whole into memory.
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20
ROLES = ("system", "user", "assistant", "developer", "tool")


def no_template(model: str) -> HttpError:
    return HttpError(400, f"model {model!r} has no chat template (tokenizer_config.json chat_template); "
                          "use /v1/completions with a prompt instead", reason="NO_CHAT_TEMPLATE", param="model")


@lru_cache(maxsize=64)
def _read_template(source_path: str, mtime_ns: int) -> tuple[str | None, dict]:
    """(template, special tokens) from a checkpoint folder; cached per file version."""
    path = Path(source_path) / "tokenizer_config.json"
    if path.stat().st_size > MAX_TOKENIZER_CONFIG_BYTES:
        return None, {}
    config = json.loads(path.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        chat_file = Path(source_path) / "chat_template.jinja"  # newer checkpoints keep it apart
        if chat_file.is_file() and chat_file.stat().st_size <= MAX_TOKENIZER_CONFIG_BYTES:
            template = chat_file.read_text(encoding="utf-8")

    def token(name: str) -> str:
        value = config.get(name)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return (template if isinstance(template, str) else None,
            {name: token(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")})


def template_for(source_path: str) -> tuple[str | None, dict]:
    path = Path(source_path) / "tokenizer_config.json"
    try:
        return _read_template(source_path, path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return None, {}


def check_messages(messages) -> list[dict]:
    """OpenAI's messages -> [{"role", "content"}] with text content (parts of type "text" joined)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {role, content} objects", "messages",
                      reason="EMPTY_INPUT")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"messages[{n}] needs a role, one of {', '.join(ROLES)}", f"messages[{n}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts can reach a text model
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise invalid(f"messages[{n}].content: only text parts are supported", f"messages[{n}].content",
                              reason="UNSUPPORTED_FORMAT")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{n}].content must be a string or a list of text parts", f"messages[{n}].content")
        checked.append({"role": message["role"], "content": content})
    return checked


def render(template: str, special_tokens: dict, messages: list[dict]) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                        **special_tokens)
    except TemplateError as exc:  # the template refuses these messages (e.g. roles out of order)
        raise invalid(f"the model's chat template refused these messages: {str(exc)[:300]}", "messages",
                      reason="INVALID_INPUT") from None
