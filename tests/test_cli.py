"""The `pipeserve` CLI: each command against a real server (or the scripted one for failures
a healthy server does not produce on demand), --json output, and the documented exit codes
with one clear line (no traceback) for each user mistake."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client_fakes import TLS_DIR, FakeServer
from client_models import loader_fixture, require_servicer
from pipeserve_client import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("service", "clients/python", "tests"))}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def run_process(*argv: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Runs the CLI as its own process, as a user would."""
    return subprocess.run([sys.executable, "-m", "pipeserve_client.cli", *argv], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kwargs)


loaded = loader_fixture()  # loaded(kind) -> model name


@pytest.fixture(scope="module")
def server(grpc_server):
    return grpc_server.address


@pytest.fixture
def fake():
    handle = FakeServer()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


# --- usage and exit codes -------------------------------------------------------------------

def test_help_documents_commands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("serve", "models", "transcribe", "generate", "classify-image", "zero-shot", "doc-qa",
                 "classify-text", "ner", "qa", "fill-mask", "embed", "Exit codes", "--json", "--server"):
        assert word in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["transcribe"], ["transcribe", "a.wav", "--timestamps", "year"],
                                  ["models"], ["generate", "x", "--max-new-tokens", "many"]])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE and "usage:" in err


@pytest.mark.parametrize("argv, what", [
    (["classify-image", "{missing}/cat.jpg"], "image file not found"),
    (["transcribe", "{missing}/talk.wav"], "audio file not found"),
    (["doc-qa", "{missing}/page.png", "What?"], "image file not found"),
    (["classify-image", "{missing}"], "is a directory"),
    (["qa", "Who?", "@{missing}/context.txt"], "text file not found"),
    (["--ca-cert", "{missing}/ca.pem", "models", "list"], "TLS root certificate file not found"),
])
def test_input_file_problems_exit_3(capsys, tmp_path, argv, what):
    argv = [a.replace("{missing}", str(tmp_path)) for a in argv]
    code, out, err = run(capsys, "--server", "127.0.0.1:1", *argv)
    assert code == cli.EXIT_INPUT and what in err and out == ""


def test_unreachable_server_exits_4_without_traceback():
    done = run_process("--server", "127.0.0.1:1", "models", "list")
    assert done.returncode == cli.EXIT_UNREACHABLE
    assert "cannot reach the pipeserve server at 127.0.0.1:1" in done.stderr
    assert "pipeserve serve" in done.stderr and "Traceback" not in done.stderr
    env_done = subprocess.run([sys.executable, "-m", "pipeserve_client.cli", "models", "list"], capture_output=True,
                              text=True, env={**ENV, "PIPESERVE_SERVER": "127.0.0.1:2"}, timeout=60)
    assert env_done.returncode == cli.EXIT_UNREACHABLE and "127.0.0.1:2" in env_done.stderr


def test_wrong_tls_settings_exit_4_with_a_hint(capsys):
    tls = FakeServer(tls="tls")
    mtls = FakeServer(tls="mtls")
    address, mutual = f"127.0.0.1:{tls.port}", f"127.0.0.1:{mtls.port}"
    try:
        code, out, _ = run(capsys, "--server", address, "--ca-cert", str(TLS_DIR / "ca.pem"), "models", "list")
        assert code == 0 and "fake-model" in out
        code, _, err = run(capsys, "--server", address, "models", "list")  # plaintext to a TLS server
        assert code == cli.EXIT_UNREACHABLE and "--tls" in err
        code, _, err = run(capsys, "--server", address, "--ca-cert", str(TLS_DIR / "other_ca.pem"), "models", "list")
        assert code == cli.EXIT_UNREACHABLE and "TLS" in err and "--ca-cert" in err
        code, _, err = run(capsys, "--server", mutual, "--ca-cert", str(TLS_DIR / "ca.pem"), "models", "list")
        assert code == cli.EXIT_UNREACHABLE and "--cert/--key" in err
        code, out, _ = run(capsys, "--server", mutual, "--ca-cert", str(TLS_DIR / "ca.pem"), "--cert",
                           str(TLS_DIR / "client.pem"), "--key", str(TLS_DIR / "client.key"), "models", "list")
        assert code == 0 and "fake-model" in out
        code, _, err = run(capsys, "--server", mutual, "--ca-cert", str(TLS_DIR / "ca.pem"), "--cert",
                           str(TLS_DIR / "client.pem"), "models", "list")
        assert code == cli.EXIT_USAGE and "both a client certificate and its key" in err
    finally:
        tls.stop()
        mtls.stop()


def test_token_option_and_environment(capsys, fake, monkeypatch):
    fake.token = "s3cret"
    code, _, err = run(capsys, "--server", fake.address, "models", "list")
    assert code == cli.EXIT_REJECTED and "UNAUTHENTICATED" in err
    code, out, _ = run(capsys, "--server", fake.address, "--token", "s3cret", "models", "list")
    assert code == 0 and "fake-model" in out
    monkeypatch.setenv("PIPESERVE_TOKEN", "s3cret")
    assert run(capsys, "--server", fake.address, "models", "list")[0] == 0


def test_server_going_away_mid_stream_exits_8(tmp_path):
    """A server process that dies after two tokens: the tokens are printed, then a clear message."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "client_fakes.py"), "exit_after"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        address = server.stdout.readline().strip()
        done = run_process("--server", address, "generate", "Once")
    finally:
        server.kill()
        server.wait()
    assert done.returncode == cli.EXIT_STREAM_LOST
    assert done.stdout == "Once upon\n"
    assert "lost mid-stream after 2 message(s)" in done.stderr and "Traceback" not in done.stderr


def test_deadline_exits_7_and_internal_error_exits_6(capsys, fake):
    fake.plan = ["slow", "internal", "draining"]
    code, _, err = run(capsys, "--server", fake.address, "--timeout", "0.3", "models", "list")
    assert code == cli.EXIT_DEADLINE and "--timeout" in err
    code, _, err = run(capsys, "--server", fake.address, "models", "list")
    assert code == cli.EXIT_SERVER_ERROR and "the server failed" in err
    code, _, err = run(capsys, "--server", fake.address, "--no-retry", "models", "list")
    assert code == cli.EXIT_UNREACHABLE and "shutting down" in err


def test_generate_streams_tokens_and_json_lines(capsys, fake):
    code, out, _ = run(capsys, "--server", fake.address, "generate", "Once")
    assert code == 0 and out == "Once upon a time\n"
    code, out, _ = run(capsys, "--server", fake.address, "generate", "Once", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [l["token"]["text"] for l in lines[:-1]] == ["Once", " upon", " a", " time"]
    assert lines[-1]["done"]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_transcribe_prints_final_segments_and_progress(capsys, fake, tmp_path):
    """Interim segments are not printed; their final version is; progress goes to stderr
    against the file's duration."""
    import soundfile

    path = tmp_path / "talk.wav"
    soundfile.write(path, np.zeros(48000, dtype=np.float32), 16000)  # 3 seconds
    code, out, err = run(capsys, "--server", fake.address, "transcribe", str(path), "--progress",
                         "--timestamps", "word", "--language", "en")
    assert code == 0
    assert out.splitlines() == ["[00:00.00 -> 00:01.00] part 0", "[00:01.00 -> 00:02.00] part 1",
                                "[00:02.00 -> 00:03.00] part 2"]
    assert "100%" in err and "00:03.00 / 00:03.00" in err and "\r" in err
    request = fake.requests[-1]
    assert request.options.language == "en" and request.options.return_timestamps == 3
    code, out, err = run(capsys, "--server", fake.address, "transcribe", str(path))
    assert code == 0 and len(out.splitlines()) == 3 and err == ""  # no progress when stderr is not a terminal
    code, out, _ = run(capsys, "--server", fake.address, "transcribe", str(path), "--no-stream")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = run(capsys, "--server", fake.address, "--json", "transcribe", str(path))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [l["segment"].get("is_final", False) for l in lines[:-1]] == [True, False, True, True]
    assert lines[-1]["done"]["transcription"]["language"] == "en"


# --- against the real server ----------------------------------------------------------------

def test_models_commands(capsys, server, loaded, tmp_path):
    vit = loaded("vit")
    code, out, _ = run(capsys, "--server", server, "models", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "TASK", "STATE"]
    assert any(line.startswith(vit) and "image-classification" in line and "ready" in line
               for line in out.splitlines())
    code, out, _ = run(capsys, "models", "list", "--json", "--server", server, "--task", "image-classification")
    assert code == 0 and vit in [m["name"] for m in json.loads(out)["models"]]
    code, out, _ = run(capsys, "--server", server, "models", "get", vit)
    assert code == 0 and "image-classification, vit (ViTForImageClassification), ready" in out
    # Another directory (one directory is one model, however it is spelled), with a trailing slash.
    source = str(shutil.copytree(vit, tmp_path / "vit")) + "/"
    canonical = source.rstrip("/")  # the name the server lists it under
    code, out, err = run(capsys, "--server", server, "models", "load", source, "--dtype", "float32",
                         "--option", "top_k=2", "--int8")
    assert code == 0 and out.startswith(f"loaded {canonical}:") and "loading" in err
    assert "int8/float32" in out and "default options: top_k=2" in out
    code, out, _ = run(capsys, "--server", server, "models", "get", source)
    assert code == 0 and "default options: top_k=2" in out
    assert json.loads(run(capsys, "--server", server, "--json", "models", "get", source)[1])["default_options"] == \
        {"top_k": 2}
    code, out, _ = run(capsys, "--server", server, "models", "list")
    [row] = [line for line in out.splitlines() if line.startswith(canonical + " ")]
    assert "int8/float32" in row
    code, out, _ = run(capsys, "--server", server, "--json", "classify-image", str(Path(vit) / "config.json"),
                       "--model", source)
    assert code == cli.EXIT_REJECTED
    code, out, _ = run(capsys, "--server", server, "models", "unload", source)
    assert code == 0 and out == f"unloaded {canonical} (image-classification)\n"
    code, _, err = run(capsys, "--server", server, "models", "get", source)
    assert code == cli.EXIT_REJECTED and "MODEL_NOT_FOUND" in err
    code, _, err = run(capsys, "--server", server, "models", "load", "/definitely/not/here")
    assert code == cli.EXIT_REJECTED and "NOT_FOUND" in err


def test_classify_image(capsys, server, loaded, photo, tmp_path):
    vit = loaded("vit")
    code, out, _ = run(capsys, "--server", server, "classify-image", str(photo), "--model", vit, "--top-k", "3")
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all(r[0].startswith("class_") and 0 < float(r[1]) < 1 for r in rows)
    code, out, _ = run(capsys, "--server", server, "--json", "classify-image", str(photo), "--model", vit,
                       "--top-k", "3")
    labels = json.loads(out)["labels"]
    assert code == 0 and [[l["label"], f"{l['score']:.4f}"] for l in labels] == rows
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello, I am not an image")
    code, out, err = run(capsys, "--server", server, "classify-image", str(text_file), "--model", vit)
    assert code == cli.EXIT_REJECTED and "the server rejected the request" in err and "INVALID_ARGUMENT" in err
    code, _, err = run(capsys, "--server", server, "classify-image", str(photo), "--model", vit, "--top-k", "0")
    assert code == cli.EXIT_REJECTED and "INVALID_PARAMETER" in err and "field: top_k" in err


def test_classify_image_from_stdin(server, loaded, photo):
    vit = loaded("vit")
    done = run_process("--server", server, "classify-image", "-", "--model", vit, "--top-k", "1",
                       stdin=open(photo, "rb"))
    assert done.returncode == 0 and done.stdout.startswith("class_"), done.stderr


def test_serve_starts_a_server_that_drains_on_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeserve_client.cli", "serve", "--listen", f"127.0.0.1:{port}",
                               "--embedded-defaults", "false"], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = run_process("--server", f"127.0.0.1:{port}", "--no-retry", "models", "list")
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0 and "no models loaded" in done.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --- one command per task (each runs once its servicer has landed) ----------------------------

def _json(capsys, server, *argv):
    code, out, err = run(capsys, "--server", server, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def test_zero_shot_command(capsys, server, loaded):
    require_servicer("zero_shot_classification")
    model = loaded("nli")
    code, out, _ = run(capsys, "--server", server, "zero-shot", "The fox jumps over the dog.", "--labels",
                       "animals,politics", "--model", model)
    assert code == 0 and sorted(line.split()[0] for line in out.splitlines()) == ["animals", "politics"]
    result = _json(capsys, server, "zero-shot", "The fox jumps over the dog.", "--labels", "animals,politics",
                   "--model", model, "--multi-label")
    assert sorted(l["label"] for l in result["labels"]) == ["animals", "politics"]


def test_doc_qa_command(capsys, server, loaded, tmp_path):
    require_servicer("document_question_answering")
    import shutil

    if shutil.which("tesseract") is None:
        pytest.skip("tesseract is not installed (scripts/setup installs tesseract-ocr)")
    from zero_shot_docqa_checkpoints import render_invoice

    model = loaded("layoutlm")
    page = tmp_path / "invoice.png"
    render_invoice().save(page)
    result = _json(capsys, server, "doc-qa", str(page), "What is the total?", "--model", model, "--top-k", "2")
    assert result["words"] and len(result.get("answers", [])) <= 2
    code, out, _ = run(capsys, "--server", server, "doc-qa", str(page), "What is the total?", "--model", model)
    assert code == 0 and out.strip()


def test_classify_text_command(capsys, server, loaded):
    require_servicer("text_classification")
    model = loaded("sequence_classification")
    result = _json(capsys, server, "classify-text", "Hugging Face is in Paris.", "--model", model, "--top-k", "2")
    assert len(result["labels"]) == 2
    code, out, _ = run(capsys, "--server", server, "classify-text", "Hugging Face is in Paris.", "--pair", "Yes.",
                       "--model", model)
    assert code == 0 and out.strip()


def test_ner_command(capsys, server, loaded):
    require_servicer("token_classification")
    model = loaded("token_classification")
    text = "My name is Wolfgang and I live in Berlin."
    result = _json(capsys, server, "ner", text, "--model", model, "--aggregation", "simple")
    for entity in result.get("entities", []):
        assert text[entity.get("start", 0):entity["end"]].strip()
    code, out, _ = run(capsys, "--server", server, "ner", text, "--model", model)
    assert code == 0 and out.strip()


def test_qa_command(capsys, server, loaded, tmp_path):
    require_servicer("question_answering")
    model = loaded("question_answering")
    context = tmp_path / "context.txt"
    context.write_text("Paris is the capital of France.")
    result = _json(capsys, server, "qa", "What is the capital of France?", f"@{context}", "--model", model)
    answer = result["answers"][0]
    assert "Paris is the capital of France."[answer.get("start", 0):answer["end"]] == answer["answer"]


def test_fill_mask_command(capsys, server, loaded):
    require_servicer("fill_mask")
    model = loaded("masked_lm")
    result = _json(capsys, server, "fill-mask", "Paris is the [MASK] of France.", "--model", model, "--top-k", "2")
    assert len(result["masks"]) == 1 and len(result["masks"][0]["candidates"]) == 2
    code, out, _ = run(capsys, "--server", server, "fill-mask", "Paris is the [MASK] of France.", "--model", model)
    assert code == 0 and out.strip()


def test_embed_command(capsys, server, loaded):
    require_servicer("feature_extraction")
    model = loaded("base")
    result = _json(capsys, server, "embed", "The quick brown fox.", "--model", model, "--pooling", "mean")
    assert len(result["sentence_embedding"]["values"]) == result["dimensions"] == 32
    code, out, _ = run(capsys, "--server", server, "embed", "The quick brown fox.", "--model", model)
    assert code == 0 and "32 dimensions" in out


def test_generate_command_against_the_server(capsys, server, loaded):
    require_servicer("text_generation")
    model = loaded("gpt2")
    code, streamed, _ = run(capsys, "--server", server, "generate", "The quick brown", "--model", model,
                            "--max-new-tokens", "4", "--seed", "3")
    code2, whole, _ = run(capsys, "--server", server, "generate", "The quick brown", "--model", model,
                          "--max-new-tokens", "4", "--seed", "3", "--no-stream")
    # The stream prints the new tokens; the whole text has the prompt first by default
    # (return_full_text, as transformers' text-generation pipeline does).
    assert code == code2 == 0 and streamed.endswith("\n") and whole in (streamed, "The quick brown" + streamed)


def test_transcribe_command_streams_segments_with_progress(capsys, server, loaded, tmp_path):
    require_servicer("speech_recognition")
    import soundfile

    from wav2vec2_checkpoints import audio

    model = loaded("ctc")
    path = tmp_path / "speech.wav"
    soundfile.write(path, audio(2.0).astype(np.float32), 16000)
    code, out, err = run(capsys, "--server", server, "transcribe", str(path), "--model", model, "--progress",
                         "--timestamps", "char")
    assert code == 0
    lines = out.splitlines()
    assert lines and all(line.lstrip().startswith("[") and "->" in line for line in lines)
    assert any(line.startswith("    [") for line in lines), "character timings print under their segment"
    assert "%" in err and "00:02.00" in err  # progress against the file's known duration
    messages = [json.loads(line) for line in run(capsys, "--server", server, "--json", "transcribe", str(path),
                                                 "--model", model)[1].splitlines()]
    assert "done" in messages[-1]
    code, whole, _ = run(capsys, "--server", server, "transcribe", str(path), "--model", model, "--no-stream",
                         "--timestamps", "char")
    assert code == 0 and whole.splitlines() == lines
