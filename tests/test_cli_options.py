"""CLI options reach the request: each command run in-process against a recording client
(no server), so what the CLI sends and prints is checked exactly."""
from __future__ import annotations

import pytest

from pipeserve_client import cli


class RecordingClient:
    """Stands in for pipeserve_client.client.Client: records each call's keyword arguments
    and answers with `responses[method]`."""

    calls: list[tuple[str, tuple, dict]] = []
    responses: dict = {}

    def __init__(self, target, **kwargs):
        self.target = target
        self.models = _Models(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _record(self, method, args, kwargs):
        RecordingClient.calls.append((method, args, kwargs))
        answer = RecordingClient.responses[method]
        return answer(*args, **kwargs) if callable(answer) else answer

    def __getattr__(self, method):
        return lambda *args, **kwargs: self._record(method, args, kwargs)


class _Models:
    def __init__(self, client):
        self.client = client

    def __getattr__(self, verb):
        return lambda *args, **kwargs: self.client._record(f"models.{verb}", args, kwargs)


@pytest.fixture
def recorder(monkeypatch):
    import pipeserve_client.client as client_module

    RecordingClient.calls, RecordingClient.responses = [], {}
    monkeypatch.setattr(client_module, "Client", RecordingClient)
    return RecordingClient


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_turns_normalisation_and_truncation_on_and_off(capsys, recorder):
    from pipeserve.v1 import feature_extraction_pb2 as pb

    recorder.responses["extract_features"] = pb.ExtractFeaturesResponse(dimensions=2, tokens=1)
    for flags, normalize, truncate in ((["--no-normalize"], False, None), (["--normalize", "--truncate"], True, True),
                                       (["--no-truncate"], None, False), ([], None, None)):
        code, _, _ = run(capsys, "embed", "a text", "--pooling", "none", *flags)
        assert code == 0
        kwargs = recorder.calls[-1][2]
        assert (kwargs["pooling"], kwargs["normalize"], kwargs["truncate"]) == ("none", normalize, truncate)


def test_transcribe_sends_chunk_length_and_batch_size(capsys, recorder, tmp_path):
    from pipeserve.v1 import speech_recognition_pb2 as pb

    path = tmp_path / "talk.wav"
    path.write_bytes(b"RIFF")  # the recording client never decodes it
    recorder.responses["transcribe"] = pb.TranscribeResponse(transcription=pb.Transcription(text=" hi"))
    code, out, _ = run(capsys, "transcribe", str(path), "--no-stream", "--chunk-length", "30", "--batch-size", "4")
    assert code == 0 and out.strip() == "hi"
    kwargs = recorder.calls[-1][2]
    assert (kwargs["chunk_length_s"], kwargs["batch_size"]) == (30.0, 4)


def test_models_load_resolves_a_local_directory_and_says_so(capsys, recorder, tmp_path, monkeypatch):
    from pipeserve.v1 import model_pb2

    (tmp_path / "my-vit").mkdir()
    monkeypatch.chdir(tmp_path)
    recorder.responses["models.load"] = lambda name, **_: model_pb2.ModelInfo(name=name, family="vit")
    code, out, err = run(capsys, "models", "load", "./my-vit")
    assert code == 0
    assert recorder.calls[-1][1] == (str(tmp_path / "my-vit"),)
    assert f"asking the server to load {tmp_path / 'my-vit'}" in err and "own machine" in err
    assert f"loaded {tmp_path / 'my-vit'}" in out
    # A Hub id, or a path that exists only on the server's machine, goes as given.
    for name in ("google/vit-base-patch16-224", "/models/on/the/server"):
        code, _, err = run(capsys, "models", "load", name)
        assert code == 0 and recorder.calls[-1][1] == (name,) and "asking the server" not in err


def test_json_errors_are_one_object_on_stderr(capsys, recorder):
    from pipeserve_client import errors as E

    def rejected(*args, **kwargs):
        raise E.InvalidArgumentError("question is empty", code=_code("INVALID_ARGUMENT"), reason="EMPTY_INPUT",
                                     metadata={"field": "question"})

    recorder.responses["answer_question"] = rejected
    code, out, err = run(capsys, "--json", "qa", "   ", "Paris is in France.")
    assert code == cli.EXIT_REJECTED and out == ""
    [line] = err.splitlines()
    error = __import__("json").loads(line)["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["reason"] == "EMPTY_INPUT"
    assert error["metadata"] == {"field": "question"} and error["exit_code"] == cli.EXIT_REJECTED
    assert "question is empty" in error["message"]
    # Failures found by the CLI itself too.
    code, _, err = run(capsys, "--json", "models", "load", "x", "--option", "novalue")
    [line] = err.splitlines()
    assert code == cli.EXIT_USAGE and __import__("json").loads(line)["error"]["exit_code"] == cli.EXIT_USAGE
    # Without --json: the one line of text, as before.
    code, _, err = run(capsys, "qa", "   ", "Paris is in France.")
    assert code == cli.EXIT_REJECTED and err.startswith("pipeserve: the server rejected the request")


def _code(name):
    import grpc

    return getattr(grpc.StatusCode, name)


def test_progress_starts_at_the_first_window_and_ends_full(capsys, recorder, tmp_path):
    import numpy as np
    import soundfile

    from pipeserve.v1 import speech_recognition_pb2 as pb

    path = tmp_path / "talk.wav"
    soundfile.write(path, np.zeros(48000, dtype=np.float32), 16000)  # 3 s
    segments = [pb.Segment(id="0", start_s=0.0, end_s=1.4, text=" one", is_final=True),
                pb.Segment(id="1", start_s=1.4, end_s=2.94, text=" two", is_final=True)]  # ends before the audio
    recorder.responses["transcribe"] = [
        *[pb.TranscribeStreamResponse(segment=s) for s in segments],
        pb.TranscribeStreamResponse(done=pb.TranscriptionDone(transcription=pb.Transcription(
            text=" one two", segments=segments, duration_s=3.0)))]
    code, out, err = run(capsys, "transcribe", str(path), "--progress")
    assert code == 0 and len(out.splitlines()) == 2
    frames = [f for f in err.split("\r") if f.strip()]
    assert "0%" not in frames[0] and "first window" in frames[0]
    assert "47%" in err  # the first decoded window: 1.4 of 3 s
    final = [f for f in frames if "%" in f][-1]
    assert "100%" in final and "00:03.00 / 00:03.00" in final and err.endswith("\n")
