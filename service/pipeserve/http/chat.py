"""OpenAI chat messages -> the ChatMessage list GenerateRequest.messages carries. The model's
own chat template renders them on the server (inputs/chat.py, jinja2's sandbox, as
transformers' pipeline does), so /v1/chat/completions and gRPC Generate with messages give the
same prompt ids; a model without a template answers 400 CHAT_TEMPLATE_MISSING from there."""
from __future__ import annotations

from .errors import invalid

ROLES = ("system", "user", "assistant", "developer", "tool")


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


def chat_messages(messages) -> list:
    """The checked messages as GenerateRequest.messages."""
    from pipeserve.v1 import text_generation_pb2 as pb

    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in check_messages(messages)]
