"""Chat input: role/content messages rendered by the model's chat template, as transformers'
pipeline("text-generation") renders a chat. Tiny random Gemma 3 and Llama checkpoints with a
Gemma-style and a Llama-style template (tests/chat_templates.py): the prompt ids equal the
pipeline's (the template writes BOS; nothing is added again), greedy tokens equal generate's,
the text equals the assistant message the pipeline returns; a chat ending with an assistant
message continues it. Then where the template comes from, and the chats refused."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.utils.chat_template_utils import Chat

from chat_templates import GEMMA_STYLE, LLAMA_STYLE, with_template
from generation_checkpoints import build
from harness import load_pipeline

NEW = 12
CHATS = [
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello world, this"},
     {"role": "assistant", "content": "is a tiny corpus"}, {"role": "user", "content": "Café, naïve 🙂 "}],
]
PREFILL = [{"role": "user", "content": "Numbers 0123456789"}, {"role": "assistant", "content": "and punctuation"}]
TEMPLATES = {"gemma3": GEMMA_STYLE, "llama": LLAMA_STYLE}


def _messages(chat):
    from pipeserve.inputs.chat import ChatMessage

    return [ChatMessage(m["role"], m["content"]) for m in chat]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    directory = tmp_path_factory.mktemp(f"chat_{family}")
    model, _ = build(family, directory, special_tokens=True, max_position_embeddings=512)
    with_template(directory, TEMPLATES[family])
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe = load_pipeline(directory)
    yield model, tokenizer, reference, pipe
    pipe.close()


def _expected_ids(reference, chat):
    return reference.preprocess(Chat(chat))["input_ids"][0].tolist()


@pytest.mark.parametrize("chat", CHATS + [PREFILL], ids=["one-turn", "four-turns", "prefill"])
def test_chat_matches_the_transformers_pipeline(checkpoint, chat):
    model, tokenizer, reference, pipe = checkpoint
    expected_ids = _expected_ids(reference, chat)
    # the template wrote BOS, once: tokenizing added nothing more
    assert expected_ids[0] == tokenizer.bos_token_id and expected_ids[1] != tokenizer.bos_token_id
    [result] = pipe.generate([_messages(chat)], {"max_new_tokens": NEW, "min_new_tokens": NEW})
    assert result.prompt_tokens == len(expected_ids)
    with torch.no_grad():
        generated = model.generate(torch.tensor([expected_ids]), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, pad_token_id=tokenizer.eos_token_id)
    [sequence] = result.sequences
    assert [t.token for t in sequence.tokens] == generated[0, len(expected_ids):].tolist()
    [record] = reference(chat, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    reply = record["generated_text"][-1]
    assert reply["role"] == "assistant" and len(record["generated_text"]) == len(chat) + (chat[-1]["role"] != "assistant")
    assert sequence.text == reply["content"]  # a continued message comes back whole
    [new_only] = reference(chat, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_full_text=False)
    [result] = pipe.generate([_messages(chat)], {"max_new_tokens": NEW, "min_new_tokens": NEW,
                                                 "return_full_text": False})
    assert result.sequences[0].text == new_only["generated_text"]


def test_a_chat_and_its_rendered_prompt_differ_only_in_the_special_tokens_added(checkpoint):
    """The rendered text as a plain prompt gets BOS added again (the case means something)."""
    _, tokenizer, reference, pipe = checkpoint
    text = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert pipe.encode(text) == [tokenizer.bos_token_id] + _expected_ids(reference, CHATS[0])


def _saved(tmp_path, template=None, where="tokenizer_config"):
    build("llama", tmp_path, special_tokens=True, max_position_embeddings=512)
    if template is not None:
        with_template(tmp_path, template, where=where)
    return load_pipeline(tmp_path)


# Every helper transformers gives a template: strftime_now, namespace, tojson (non-ASCII kept),
# dict, loop controls, the {% generation %} tag, raise_exception (not reached), eos_token.
HELPERS = (
    "{{ bos_token }}Date: {{ strftime_now('%Y') }}\n{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ (dict(role=m.role, n=ns.n) | tojson) + m.content }}{% endif %}"
    "{% if m.role == 'never' %}{{ raise_exception('unreached') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ANSWER:{% endif %}"
)


@pytest.mark.parametrize("form", ["jinja", "named-list", "jinja-over-config", "helpers"])
def test_templates_are_read_where_transformers_reads_them(tmp_path, form):
    if form == "helpers":
        pipe = _saved(tmp_path, HELPERS)
    elif form == "jinja":
        pipe = _saved(tmp_path, LLAMA_STYLE, where="jinja")
    elif form == "named-list":
        pipe = _saved(tmp_path, [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                 {"name": "default", "template": LLAMA_STYLE}])
    else:
        build("llama", tmp_path, special_tokens=True, max_position_embeddings=512)
        with_template(tmp_path, "{{ raise_exception('old') }}")
        with_template(tmp_path, LLAMA_STYLE, where="jinja")
        pipe = load_pipeline(tmp_path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
        expected = tokenizer.apply_chat_template(CHATS[1], add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        text, continued = pipe.render_chat(_messages(CHATS[1]))
        assert continued == ""
        assert pipe.encode(text, chat=True) == list(expected)
    finally:
        pipe.close()


def _refusal(pipe, chat) -> tuple[str, str]:
    from pipeserve.errors import PipeserveError

    with pytest.raises(PipeserveError) as caught:
        pipe.start(_messages(chat), None)
    assert caught.value.code.name == "INVALID_ARGUMENT"
    return caught.value.reason, caught.value.message


def test_chats_the_model_cannot_take_are_refused_with_their_reason(tmp_path):
    none = _saved(tmp_path / "none")
    gemma = _saved(tmp_path / "gemma", GEMMA_STYLE)
    broken = _saved(tmp_path / "broken", "{% for m in messages %}{{ m.content }")
    nameless = _saved(tmp_path / "nameless", [{"name": "tool_use", "template": LLAMA_STYLE}])
    try:
        assert _refusal(none, CHATS[0])[0] == "CHAT_TEMPLATE_MISSING"
        reason, message = _refusal(gemma, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        assert reason == "CHAT_TEMPLATE_ERROR" and "Conversation roles must alternate" in message
        reason, message = _refusal(gemma, [{"role": "narrator", "content": "a"}])
        assert reason == "CHAT_TEMPLATE_ERROR" and "Conversation roles must alternate" in message
        assert _refusal(gemma, [])[0] == "CHAT_INVALID"
        for role in ("", "User", "user<|im_start|>", "x" * 33, "us er"):
            assert _refusal(gemma, [{"role": role, "content": "a"}])[0] == "CHAT_ROLE_INVALID"
        assert _refusal(broken, CHATS[0])[0] == "CHAT_TEMPLATE_INVALID"
        reason, message = _refusal(nameless, CHATS[0])
        assert reason == "CHAT_TEMPLATE_INVALID" and "tool_use" in message
        # a template's sandbox holds: no attribute escapes to Python internals
        unreadable = _saved(tmp_path / "unreadable")
        (tmp_path / "unreadable" / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff\xfe")
        pipe = load_pipeline(tmp_path / "unreadable")  # loads: prompts are still served
        try:
            assert _refusal(pipe, CHATS[0])[0] == "CHAT_TEMPLATE_INVALID"
            assert pipe.generate(["The quick"], {"max_new_tokens": 2})[0].sequences[0].generated_tokens >= 1
        finally:
            pipe.close()
            unreadable.close()
        escape = _saved(tmp_path / "escape", "{{ messages.__class__.__mro__[1].__subclasses__() }}")
        try:
            assert _refusal(escape, CHATS[0])[0] == "CHAT_TEMPLATE_ERROR"
        finally:
            escape.close()
        # each refusal left the model serving
        [result] = gemma.generate([_messages(CHATS[0])], {"max_new_tokens": 3})
        assert result.sequences[0].generated_tokens >= 1
    finally:
        for pipe in (none, gemma, broken, nameless):
            pipe.close()


def test_a_gguf_files_chat_template_is_used_and_files_beside_it_are_not(tmp_path):
    """A GGUF checkpoint's `tokenizer.chat_template` reaches the template (its loader provides it
    as tokenizer_config.json's chat_template); a chat_template.jinja beside the file is not read,
    as transformers' from_pretrained(gguf_file=...) reads none. Ids equal transformers' tokenizer
    from the same file; greedy tokens equal the model the file was written from."""
    from gguf_checkpoints import build_llama_gguf

    path, model = build_llama_gguf(tmp_path, chat_template=LLAMA_STYLE, max_position_embeddings=512)
    (path.parent / "chat_template.jinja").write_text("{{ raise_exception('not this one') }}", encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    expected = tokenizer.apply_chat_template(CHATS[1], add_generation_prompt=True)["input_ids"]
    pipe = load_pipeline(path.parent)
    try:
        [result] = pipe.generate([_messages(CHATS[1])], {"max_new_tokens": NEW, "min_new_tokens": NEW})
        assert result.prompt_tokens == len(expected)
        assert pipe.encode(pipe.render_chat(_messages(CHATS[1]))[0], chat=True) == expected
        with torch.no_grad():
            generated = model.generate(torch.tensor([expected]), max_new_tokens=NEW, min_new_tokens=NEW,
                                       do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert [t.token for t in result.sequences[0].tokens] == generated[0, len(expected):].tolist()
    finally:
        pipe.close()
