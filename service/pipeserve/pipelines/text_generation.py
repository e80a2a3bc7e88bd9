"""The text-generation pipeline (transformers' TextGenerationPipeline): prompt -> tokens ->
the model's continuous-batching engine -> text.

Option defaults: transformers' (max_new_tokens 256 as the pipeline sets it, top_k 50, ...),
overridden by the checkpoint's generation_config.json, then by LoadModel's defaults, then by
each request. Prompts are tokenized with the tokenizer's special tokens, as transformers'
pipeline does (it calls the tokenizer with its defaults): tokenizer.json's post-processor decides,
so Llama, Gemma and OPT prompts start with their BOS and GPT-2's get nothing added. The new text
is decode(generated ids, skip_special_tokens), preceded by the prompt text when return_full_text
is set.

Chat input (a list of role/content messages) is rendered by the model's chat template
(inputs/chat.py) and tokenized without adding special tokens, as transformers' pipeline does for
a chat: the template wrote them. The text is then the assistant's reply, preceded (with
return_full_text) by the final assistant message the chat asked to continue.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from torch import nn

from ..checkpoints.hub import ModelFiles
from ..errors import InputTooLarge, InvalidInput, ModelLoadFailed
from ..inputs.chat import Chat, ChatTemplate
from ..layers.passes import VerifiedHeadSite
from ..scheduling.generation import GenerationParams
from ..scheduling.generation_engine import DoneEvent, GenerationEngine, RequestHandle, TokenEvent
from ..tasks import Task
from .base import LoadOptions, Pipeline, load_family_model, replace_options
from .options import TaskOptions

# A prompt longer than this many characters per context token cannot fit (tokens average ~4
# characters); refusing it before tokenizing keeps a huge prompt from stalling the event loop.
_MAX_CHARS_PER_TOKEN = 64

# generation_config.json fields that are request options under the same name.
_GENERATION_CONFIG_FIELDS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                             "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences")


@dataclass(frozen=True)
class TextGenerationOptions(TaskOptions):
    """GenerateRequest's options: GenerationParams' fields (scheduling/generation.py, which
    checks them) less the model's eos ids, with transformers' pipeline defaults."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] | None = None
    ignore_eos: bool = False
    seed: int | None = None  # None: a fresh random seed per request when sampling, 0 when greedy
    num_return_sequences: int = 1
    return_full_text: bool = True
    logprobs: int = 0
    return_logprobs: bool = False


@dataclass
class SequenceResult:
    text: str
    finish_reason: str
    generated_tokens: int
    tokens: list[TokenEvent] = field(default_factory=list)


@dataclass
class GenerationResult:
    sequences: list[SequenceResult]
    prompt_tokens: int
    seed: int


@dataclass
class Started:
    """A submitted generation: iterate `handle` for TokenEvent/DoneEvent (sync or async)."""

    handle: RequestHandle
    prompt: str  # what return_full_text puts before the new text (for a chat: the continued message)
    prompt_ids: list[int]
    params: GenerationParams

    def full_text(self, text: str) -> str:
        return self.prompt + text if self.params.return_full_text else text


def _verified_head_site(model: nn.Module) -> VerifiedHeadSite | None:
    """Plain greedy rows read the output projection through an int8 screen (layers/int8_head.py;
    the pass checks: a CPU float32 head and oneDNN's int8 GEMM with VNNI, else the bfloat16
    screen where bfloat16 is native) where the head is tied to the input embedding, whose dense
    float32 weight stays for the exact rescoring (an untied head keeps only its packed copy)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return None
    if any(isinstance(m, nn.Embedding) and m.weight is head.weight for m in model.modules()):
        return VerifiedHeadSite(model, "verified_head", head.weight, screen="int8")
    return None


class TextGenerationPipeline(Pipeline):
    task = Task.TEXT_GENERATION
    options_type: ClassVar[type[TaskOptions]] = TextGenerationOptions

    def __init__(self, files: ModelFiles, options: LoadOptions, model, tokenizer, *, eos_ids: list[int],
                 clean_up_spaces: bool, generation_defaults: dict[str, Any], chat_template: ChatTemplate | None = None):
        if options.device == "auto":
            # device_map placed the model; the pipeline's device is where its inputs go
            options = replace_options(options, device=str(next(model.parameters()).device))
        super().__init__(files, options, files.config.get("model_type", ""),
                         (files.config.get("architectures") or [""])[0])
        self.defaults = {**TextGenerationOptions.builtin_defaults(), **generation_defaults, **options.defaults}
        if self.defaults.get("max_new_tokens") is not None:
            # A default (256, as transformers' pipeline) is capped by a smaller model's context;
            # an explicit request value beyond the context is refused instead.
            self.defaults["max_new_tokens"] = min(int(self.defaults["max_new_tokens"]), model.max_positions)
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.modules_.append(model)
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.engine = GenerationEngine(model, tokenizer, special_ids=special, clean_up_spaces=clean_up_spaces,
                                       max_batch_size=options.generation_max_batch_size,
                                       max_batch_tokens=options.generation_max_batch_tokens,
                                       max_queued=options.max_queue)
        # The defaults are checked here, not kept checked: an unset seed must stay unset so
        # that each sampling request draws its own.
        self.default_options = self.options()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "TextGenerationPipeline":
        from tokenizers import Tokenizer

        tokenizer_json = files.tokenizer_json()  # tokenizer.json, or built from GGUF metadata
        if tokenizer_json is None:
            raise ModelLoadFailed(f"{files.path} has no tokenizer.json", reason="TOKENIZER_MISSING")
        tokenizer = Tokenizer.from_str(tokenizer_json)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        model = load_family_model(files, options, "causal_lm", verified_head=_verified_head_site)
        generation = files.read_json("generation_config.json") or {}
        tok_config = files.read_json("tokenizer_config.json") or {}
        # a multimodal checkpoint (gemma3) keeps its language model's ids in text_config
        text_config = files.config.get("text_config") or {}
        eos = generation.get("eos_token_id", files.config.get("eos_token_id", text_config.get("eos_token_id")))
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        defaults = {k: generation[k] for k in _GENERATION_CONFIG_FIELDS if generation.get(k) is not None}
        return cls(files, options, model, tokenizer, eos_ids=eos_ids,
                   clean_up_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)),
                   generation_defaults=defaults, chat_template=ChatTemplate.from_files(files, tok_config))

    # ---- calls ----------------------------------------------------------------------------
    def render_chat(self, messages: Chat) -> tuple[str, str]:
        """(the prompt text the chat template renders, the continued assistant message or "")."""
        if self.chat_template is None:
            raise InvalidInput(f"model {self.files.name!r} has no chat template (tokenizer_config.json "
                               "chat_template, chat_template.jinja): send a prompt instead of messages",
                               reason="CHAT_TEMPLATE_MISSING")
        self._check_length(sum(len(m.content) for m in messages), "chat")
        rendered = self.chat_template.render(messages)
        return rendered.text, rendered.continued

    def _check_length(self, chars: int, what: str) -> None:
        if chars > self.model.max_positions * _MAX_CHARS_PER_TOKEN:
            raise InputTooLarge(f"the {what} has {chars} characters, far more than this model's context of "
                                f"{self.model.max_positions} tokens holds")

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Prompt ids; `chat`: text a chat template rendered, which already holds its special tokens."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput("the chat template rendered nothing" if chat else "the prompt is empty")
        self._check_length(len(prompt), "prompt")
        ids = self.tokenizer.encode(prompt, add_special_tokens=not chat).ids
        if not ids:
            raise InvalidInput("the prompt has no tokens")
        limit = self.model.max_positions - 1  # room for at least one new token
        if len(ids) > limit:
            raise InputTooLarge(f"the prompt has {len(ids)} tokens; this model's context holds {limit} prompt "
                                f"tokens plus at least one new token", metadata={"limit": limit})
        server_limit = self.load_options.max_prompt_tokens
        if server_limit and len(ids) > server_limit:
            raise InputTooLarge(f"the prompt has {len(ids)} tokens; this server accepts at most {server_limit}",
                                metadata={"limit": server_limit})
        return ids

    # ---- options --------------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """GenerationParams' checks (the way transformers would refuse the values); the seed
        comes back drawn when sampling without one."""
        params = GenerationParams.from_options(options, eos_token_ids=self.eos_ids,
                                               max_positions=self.model.max_positions)
        return {name: getattr(params, name) for name in TextGenerationOptions.names()}

    def parameters(self, options: TextGenerationOptions | Mapping[str, Any] | None) -> GenerationParams:
        """The engine's parameters for these options (checked when they were built)."""
        return GenerationParams(**self.call_options(options).as_dict(), eos_token_ids=tuple(self.eos_ids))

    def start(self, prompt: str | Chat, options: TextGenerationOptions | Mapping[str, Any] | None) -> Started:
        """Submits a prompt, or a chat (a list of ChatMessage); returns at once. Call from the
        thread (or event loop) that will consume the handle."""
        if isinstance(prompt, str):
            ids, before = self.encode(prompt), prompt
        else:
            text, before = self.render_chat(prompt)
            ids = self.encode(text, chat=True)
        params = self.parameters(options)
        return Started(self.engine.submit(ids, params), before, ids, params)

    def stream(self, prompt: str | Chat, options: TextGenerationOptions | Mapping[str, Any] | None
               ) -> Iterator[TokenEvent | DoneEvent]:
        """Synchronous event stream; DoneEvent.text already includes the prompt when asked."""
        started = self.start(prompt, options)
        try:
            for event in started.handle:
                if isinstance(event, DoneEvent):
                    event.text = started.full_text(event.text)
                yield event
        finally:
            started.handle.cancel()  # a consumer that stops early frees the engine's work

    def generate(self, prompts: Sequence[str | Chat],
                 options: TextGenerationOptions | Mapping[str, Any] | None = None) -> list[GenerationResult]:
        """Whole results for several prompts; they are submitted together so they share steps."""
        started = [self.start(p, options) for p in prompts]
        results = []
        try:
            for s in started:
                done = sorted((e for e in s.handle if isinstance(e, DoneEvent)), key=lambda e: e.index)
                results.append(GenerationResult(
                    [SequenceResult(s.full_text(d.text), d.finish_reason, d.generated_tokens, d.tokens) for d in done],
                    len(s.prompt_ids), s.params.seed))
        finally:
            for s in started:
                s.handle.cancel()
        return results

    def memory_usage(self) -> dict[str, int]:
        """Weights plus the KV cache the engine holds right now (none when idle)."""
        usage = super().memory_usage()
        usage["cache"] += self.engine.cache.memory_bytes()
        return usage

    def token_text(self, token: int) -> str:
        """One token's text on its own (for top-alternative listings)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def close(self) -> None:
        self.engine.close()
        self.engine.model = None  # the engine's reference must not keep the weights alive
        super().close()
