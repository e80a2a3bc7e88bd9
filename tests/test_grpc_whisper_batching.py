"""Concurrent transcriptions on a real server batch across calls (issue 16, item 1): N
Transcribe and TranscribeStream calls sent at once answer what each answers alone, and
RunInfo.batch_size reports the windows decoded together (1 alone, more under concurrency)."""
from __future__ import annotations

import shutil

import pytest

import whisper_checkpoints as wc
from grpc_testing import load_model, make_server
from harness import run_together

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def server():
    handle = make_server(asr_max_batch_rows=8)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def model(server):
    from pipeserve.checkpoints.embedded import embedded_model_dir

    return load_model(server, embedded_model_dir("automatic-speech-recognition")).name


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpc_batch")
    return [wc.speak(s, d / f"c{i}.wav") for i, s in enumerate(wc.SENTENCES[4:9])]


def _calls(server, model, clips):
    """Five calls of different options (the last one streamed) -> functions returning
    (comparable answer, RunInfo.batch_size)."""
    from pipeserve.v1 import common_pb2, speech_recognition_pb2 as pb, speech_recognition_pb2_grpc as pb_grpc

    stub = pb_grpc.SpeechRecognitionServiceStub(server.channel)
    granularity = [pb.TIMESTAMP_GRANULARITY_SEGMENT, pb.TIMESTAMP_GRANULARITY_WORD, None,
                   pb.TIMESTAMP_GRANULARITY_SEGMENT, pb.TIMESTAMP_GRANULARITY_SEGMENT]

    def request(i):
        options = pb.TranscriptionOptions(**({"return_timestamps": granularity[i]} if granularity[i] else {}))
        if i == 3:
            options.num_beams = 2
        return pb.TranscribeRequest(model=model, request_id=f"b{i}", audio=common_pb2.AudioInput(data=clips[i]),
                                    options=options)

    def answer(t):
        return (t.text, [(s.id, s.text, round(s.start_s, 3), round(s.end_s, 3), tuple(s.tokens), s.temperature,
                          tuple((w.text, round(w.start_s, 3), round(w.end_s, 3)) for w in s.words))
                         for s in t.segments])

    def unary(i):
        response = stub.Transcribe(request(i), timeout=600)
        assert response.request_id == f"b{i}"
        return answer(response.transcription), response.run.batch_size

    def streamed(i):
        messages = list(stub.TranscribeStream(request(i), timeout=600))
        segments = [m.segment for m in messages if m.HasField("segment")]
        done = messages[-1].done
        assert [s.text for s in segments] == [s.text for s in done.transcription.segments]
        return answer(done.transcription), done.run.batch_size

    return [lambda i=i: unary(i) for i in range(4)] + [lambda: streamed(4)]


def test_concurrent_calls_answer_as_alone_and_report_the_batch(server, model, clips):
    calls = _calls(server, model, clips)
    alone = [call() for call in calls]
    assert [size for _, size in alone] == [1] * len(calls)
    results = run_together(calls)
    assert [a for a, _ in results] == [a for a, _ in alone]
    sizes = [size for _, size in results]
    assert max(sizes) > 1, sizes
    assert all(1 <= size <= 8 for size in sizes), sizes
