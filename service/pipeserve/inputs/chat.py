"""Chat input for text generation: role/content messages -> the prompt text the model's chat
template renders, as transformers' `tokenizer.apply_chat_template` renders it for the
text-generation pipeline (utils/chat_template_utils.py, tokenization_utils_base.py).

Where the template comes from, as transformers' tokenizer reads it: chat_template.jinja (and
additional_chat_templates/*.jinja, named by file) take priority over tokenizer_config.json's
`chat_template` (a string, or a list of {"name", "template"}). A GGUF checkpoint's loader puts
the file's `tokenizer.chat_template` into the tokenizer_config.json it provides. Past what the
tokenizer reads, a processor's chat_template.json ({"chat_template": ...}) is used when nothing
else names one. Of several named templates, "default" is used (tools are not offered here).

Rendering: a jinja2 ImmutableSandboxedEnvironment with transformers' settings and helpers
(trim_blocks, lstrip_blocks, loopcontrols, the {% generation %} tag, raise_exception,
strftime_now, a tojson that keeps non-ASCII, a dict() and a namespace() without dunder access),
given `messages`, `add_generation_prompt`, and the tokenizer's named special tokens (bos_token,
eos_token, ...). A chat ending with an assistant message is continued (transformers'
continue_final_message): the template renders it and the text is cut where it ends. The
rendered text is then tokenized without adding special tokens, since the template wrote them.

Roles are free-form (the template decides what it accepts, and many raise on roles they do not
know), but must be short lowercase identifiers: a template that writes '<|' + role + '|>' would
otherwise let a role forge control tokens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from ..checkpoints.hub import ModelFiles
from ..errors import InvalidInput

# Appended to a continued final message so the rendered text can be cut where it ends
# (transformers' continue_final_message_tag).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the template sees these by name.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_ROLE_CHARS = 32


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


Chat = Sequence[ChatMessage]


@dataclass(frozen=True)
class RenderedChat:
    """The prompt text, and the content of the final assistant message it continues ("" when
    the template adds a new assistant turn)."""

    text: str
    continued: str


def check_messages(messages: Chat) -> None:
    """What any chat must satisfy before a template sees it (transformers refuses an empty
    conversation; roles are bounded identifiers, see the module docstring)."""
    if not messages:
        raise InvalidInput("the chat has no messages", reason="CHAT_INVALID")
    for i, message in enumerate(messages):
        if not _ROLE.fullmatch(message.role):
            shown = message.role[:MAX_ROLE_CHARS + 8]
            raise InvalidInput(f"messages[{i}].role {shown!r} is not a role: roles are lowercase identifiers "
                               f"(letters, digits, '_' or '-', at most {MAX_ROLE_CHARS} characters) such as "
                               f"system, user, assistant or tool", reason="CHAT_ROLE_INVALID",
                               metadata={"field": f"messages[{i}].role"})


class ChatTemplate:
    """One compiled template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._compiled = None
        self._error: str | None = None
        try:
            self._compiled = _environment().from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and kin: the model still serves prompts
            self._error = f"the model's chat template does not compile: {_first_line(exc)}"

    @classmethod
    def from_files(cls, files: ModelFiles, tokenizer_config: dict[str, Any] | None = None) -> "ChatTemplate | None":
        """The checkpoint's template, None when it has none (module docstring says where from)."""
        config = tokenizer_config if tokenizer_config is not None else (files.read_json("tokenizer_config.json") or {})
        try:
            templates = _template_files(files) or _config_templates(config.get("chat_template"))
            if not templates:
                legacy = files.read_json("chat_template.json") if _directory_layout(files) else None
                templates = _config_templates((legacy or {}).get("chat_template") if isinstance(legacy, dict) else None)
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON: prompts are still served
            return cls._unusable(f"the model's chat template cannot be read: {_first_line(exc)}")
        if not templates:
            return None
        source = templates.get("default")
        if source is None:
            # transformers: "multiple chat templates with no default specified"; a chat call says so.
            return cls._unusable(f"the model has chat templates {sorted(templates)[:8]} but none named 'default'")
        special_map = files.read_json("special_tokens_map.json") or {}
        special = {}
        for name in _SPECIAL_NAMES:
            content = _token_content(config.get(name, special_map.get(name)))
            if content is not None:
                special[name] = content
        return cls(source, special)

    @classmethod
    def _unusable(cls, why: str) -> "ChatTemplate":
        template = cls.__new__(cls)
        template.source, template.special_tokens, template._compiled, template._error = "", {}, None, why
        return template

    def render(self, messages: Chat) -> RenderedChat:
        """The prompt text for `messages` (checked here too), as transformers' pipeline renders a
        chat: a new assistant turn, or the final assistant message continued."""
        check_messages(messages)
        if self._compiled is None:
            raise InvalidInput(self._error or "the model's chat template cannot be used", reason="CHAT_TEMPLATE_INVALID")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        continued = messages[-1].role == "assistant"
        if continued:
            if "content" not in self.source:
                raise InvalidInput("the chat ends with an assistant message to continue, but the model's chat "
                                   "template does not read message content", reason="CHAT_TEMPLATE_ERROR")
            chat[-1]["content"] += _CONTINUE_TAG
        try:
            text = self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=not continued, **self.special_tokens)
        except Exception as exc:  # raise_exception's TemplateError, UndefinedError, SecurityError, TypeError...
            raise InvalidInput(f"the model's chat template refused the messages: {_first_line(exc)}",
                               reason="CHAT_TEMPLATE_ERROR") from None
        if continued:
            text = _cut_at_continue_tag(text, messages[-1].content)
        return RenderedChat(text, messages[-1].content if continued else "")


def _cut_at_continue_tag(text: str, final: str) -> str:
    """transformers' render_jinja_template for continue_final_message: the text up to the tag
    (its trailing space trimmed by the template: the message's trailing space too)."""
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise InvalidInput("the chat ends with an assistant message to continue, but the model's chat template "
                           "does not write that message as given", reason="CHAT_TEMPLATE_ERROR")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


def _first_line(exc: Exception) -> str:
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _directory_layout(files: ModelFiles) -> bool:
    """A GGUF checkpoint is its one file (its metadata provides tokenizer_config.json): files
    beside it are not read, as transformers' from_pretrained(gguf_file=...) reads none."""
    return getattr(files, "gguf", None) is None


def _template_files(files: ModelFiles) -> dict[str, str]:
    """chat_template.jinja as "default", additional_chat_templates/NAME.jinja as NAME."""
    if not _directory_layout(files):
        return {}
    templates = {}
    main = files.path / "chat_template.jinja"
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    extra = files.path / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return templates


def _config_templates(value: Any) -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value
                if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    return {}


def _environment():
    """transformers' _cached_compile_jinja_template environment (its template tracking left out:
    {% generation %} renders its body)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() without the class itself, so a template cannot reach its attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore names, which lead to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env
