"""Typed pipeline contracts (pipelines/contracts.py) and per-task options (pipelines/options.py):
every registered pipeline class has its request shape's methods with the protocol's parameters;
each task's options are a frozen, hashable dataclass built once (model defaults, then the
request's set fields, then the task's checks) and passed down without being checked again."""
from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from encoder_checkpoints import build_checkpoint
from harness import load_pipeline
from pipeserve.checkpoints.registry import PIPELINES
from pipeserve.errors import InvalidParameter
from pipeserve.pipelines import contracts
from pipeserve.pipelines.options import TaskOptions
from pipeserve.scheduling.generation import GenerationParams
from pipeserve.tasks import Task


def _registered() -> list[tuple[Task, type]]:
    out = []
    for key, path in sorted(PIPELINES.items()):
        module_name, _, class_name = path.partition(":")
        out.append((Task(key.partition("/")[0]), getattr(importlib.import_module(module_name), class_name)))
    return out


REGISTERED = _registered()


def _protocol_members(protocol: type) -> dict[str, object]:
    """The methods and properties a Protocol (and the protocols it extends) declares."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass.__module__ == contracts.__name__:
            members.update({name: value for name, value in vars(klass).items()
                            if not name.startswith("_") and (callable(value) or isinstance(value, property))})
    return members


def _positional_names(function) -> list[str]:
    """Positional parameter names; a positional-only one matches any name ("*")."""
    return ["*" if p.kind == p.POSITIONAL_ONLY else p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _takes(function, declared) -> bool:
    ours, wanted = _positional_names(function), _positional_names(declared)
    return len(ours) >= len(wanted) and all(w in ("*", o) for o, w in zip(ours, wanted))


def _satisfies(cls: type, protocol: type) -> list[str]:
    """What `cls` lacks of `protocol`, checked on the class: each member present, each method
    taking the protocol's parameters by the same names in the same order."""
    problems = []
    for name, declared in _protocol_members(protocol).items():
        actual = inspect.getattr_static(cls, name, None)
        if actual is None:
            problems.append(f"no {name}")
        elif isinstance(declared, property):
            if not isinstance(actual, property):
                problems.append(f"{name} is not a property")
        elif not _takes(getattr(cls, name), declared):
            problems.append(f"{name}{inspect.signature(getattr(cls, name))} does not take "
                            f"{name}{inspect.signature(declared)}")
    return problems


@pytest.mark.parametrize("task, cls", REGISTERED, ids=[f"{t.value}-{c.__name__}" for t, c in REGISTERED])
def test_every_registered_pipeline_satisfies_its_request_shape(task, cls):
    protocol = contracts.contract_for(task)
    assert _satisfies(cls, protocol) == []
    # The other shapes' methods are absent: a servicer cannot call a pipeline the wrong way.
    for other in {contracts.BatchedPipeline, contracts.SpeechRecognitionPipeline, contracts.GenerativePipeline} - {protocol}:
        assert _satisfies(cls, other) != []


def test_live_streams_satisfy_live_transcription():
    from pipeserve.pipelines.ctc.stream import CTCLiveStream
    from pipeserve.pipelines.whisper.asr import WhisperLiveStream

    for cls in (WhisperLiveStream, CTCLiveStream):
        assert _satisfies(cls, contracts.LiveTranscription) == [], cls.__name__


@pytest.mark.parametrize("task, cls", REGISTERED, ids=[f"{t.value}-{c.__name__}" for t, c in REGISTERED])
def test_options_types_are_frozen_hashable_dataclasses(task, cls):
    options_type = cls.options_type
    assert options_type is not TaskOptions and issubclass(options_type, TaskOptions)
    assert dataclasses.is_dataclass(options_type) and options_type.__dataclass_params__.frozen
    value = options_type()
    assert hash(value) == hash(options_type()) and value == options_type()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, options_type.names()[0], None)


def test_generation_options_are_generation_params_fields():
    from pipeserve.pipelines.text_generation import TextGenerationOptions

    params = [f.name for f in dataclasses.fields(GenerationParams) if f.name != "eos_token_ids"]
    assert list(TextGenerationOptions.names()) == params


def test_merge_takes_set_fields_over_defaults_and_refuses_unknown_names():
    @dataclasses.dataclass(frozen=True)
    class Opts(TaskOptions):
        a: int = 1
        b: tuple[str, ...] | None = None

    merged = Opts.merge({"a": 1, "b": None}, {"a": None, "b": ["x"]})
    assert merged == {"a": 1, "b": ["x"]}
    built = Opts.of(merged)
    assert built == Opts(1, ("x",)) and hash(built) == hash(Opts(1, ("x",)))
    with pytest.raises(InvalidParameter, match=r"unknown default options for t: \['c'\]; known: \['a', 'b'\]"):
        Opts.check_names({"c": 1}, "t")
    with pytest.raises(TypeError):
        Opts.merge({}, {"c": 1})


@pytest.fixture(scope="module")
def text_classifier(tmp_path_factory):
    directory, _, _ = build_checkpoint("bert", "sequence_classification", tmp_path_factory.mktemp("tc"))
    return directory, load_pipeline(directory, defaults={"top_k": 2})


def test_options_build_merges_model_defaults_and_request_fields(text_classifier):
    from pipeserve.pipelines.text_classification import TextClassificationOptions

    _, pipe = text_classifier
    assert pipe.default_options == TextClassificationOptions(top_k=2, function_to_apply=None, truncation=False)
    assert pipe.options({"top_k": None, "function_to_apply": "SOFTMAX"}) == \
        TextClassificationOptions(top_k=2, function_to_apply="softmax", truncation=False)
    assert pipe.options({"top_k": 3}) == pipe.options({"top_k": 3})  # equal requests group together


def test_a_bad_option_fails_at_build_with_its_field(text_classifier):
    _, pipe = text_classifier
    with pytest.raises(InvalidParameter) as error:
        pipe.options({"top_k": 0})
    assert error.value.metadata["field"] == "top_k"
    with pytest.raises(InvalidParameter) as error:
        pipe.options({"function_to_apply": "tanh"})
    assert error.value.metadata["field"] == "function_to_apply"


def test_built_options_are_not_checked_again(text_classifier, monkeypatch):
    _, pipe = text_classifier
    built = pipe.options({"top_k": 1})
    calls = []
    monkeypatch.setattr(pipe, "check_options", lambda values: calls.append(values) or values)
    [result] = pipe.run_batch(["a short text"], built)
    assert len(result) == 1 and calls == []
    with pytest.raises(TypeError):  # another task's options are refused, not misread
        from pipeserve.pipelines.fill_mask import FillMaskOptions
        pipe.run_batch(["a short text"], FillMaskOptions())


def test_unknown_and_bad_load_defaults_still_fail_the_load(text_classifier):
    directory, _ = text_classifier
    with pytest.raises(InvalidParameter, match=r"unknown default options for text-classification: "
                                               r"\['beams'\]; known: \['function_to_apply', 'top_k', 'truncation'\]"):
        load_pipeline(directory, defaults={"beams": 2})
    with pytest.raises(InvalidParameter) as error:
        load_pipeline(directory, defaults={"top_k": -1})
    assert error.value.metadata["field"] == "top_k"


@pytest.fixture(scope="module")
def english_whisper(tmp_path_factory):
    import whisper_checkpoints as wc

    return load_pipeline(wc.build(tmp_path_factory.mktemp("whisper"), multilingual=False))


def test_whisper_model_checks_run_at_build(english_whisper):
    from pipeserve.pipelines.whisper.decoding import DecodeOptions
    from pipeserve.pipelines.whisper.options import WhisperOptions

    pipe = english_whisper
    for fields, field in (({"num_beams": pipe.max_beams + 1}, "num_beams"),
                          ({"language": "de"}, "language"),
                          ({"task": "translate"}, "task"),
                          ({"initial_prompt": " word" * 400}, "initial_prompt")):
        with pytest.raises(InvalidParameter) as error:
            pipe.options(fields)
        assert error.value.metadata["field"] == field, fields
    built = pipe.options({"return_timestamps": "TIMESTAMP_GRANULARITY_NONE", "language": "en",
                          "temperature_fallback": [0.2, 0.4]})
    assert isinstance(built, WhisperOptions) and hash(built) == hash(pipe.options(
        {"return_timestamps": "none", "language": "english", "temperature_fallback": [0.2, 0.4]}))
    assert built.language is None and built.temperature_fallback == (0.2, 0.4)  # English-only: no language token
    decode = pipe.decode_options(built)
    assert isinstance(decode, DecodeOptions) and decode.temperatures == (0.0, 0.2, 0.4)
    assert decode.return_timestamps is False


def test_transcribe_stream_yields_segments_then_one_transcription(english_whisper):
    import torch

    from pipeserve.pipelines.asr_types import Segment, Transcription

    options = english_whisper.options({"max_new_tokens": 4})
    events = list(english_whisper.transcribe_stream(torch.zeros(16000), options, lambda: False))
    assert isinstance(events[-1], Transcription)
    assert all(isinstance(e, Segment) for e in events[:-1])


def test_generation_options_are_checked_once_and_seeded_per_request(tmp_path):
    import generation_checkpoints as gc
    from pipeserve.pipelines.text_generation import TextGenerationOptions

    gc.build("gpt2", tmp_path / "gpt2")
    pipe = load_pipeline(tmp_path / "gpt2")
    try:
        with pytest.raises(InvalidParameter, match="top_p"):
            pipe.options({"top_p": 0.0})
        greedy = pipe.options({"max_new_tokens": 3})
        assert isinstance(greedy, TextGenerationOptions) and greedy.seed == 0 and greedy.stop == ()
        sampled = {pipe.options({"do_sample": True}).seed for _ in range(4)}
        assert len(sampled) > 1  # an unset seed is drawn per request, not once at load
        params = pipe.parameters(greedy)
        assert params.max_new_tokens == 3 and params.eos_token_ids == tuple(pipe.eos_ids)
    finally:
        pipe.close()
