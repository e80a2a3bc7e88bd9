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
