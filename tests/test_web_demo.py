"""The web demo end to end: the stdlib HTTP bridge (clients/web/demo.py) over a real gRPC
server, first at the HTTP level, then in headless Chromium (Debian chromium + chromium-driver,
driven by selenium) uploading files and watching results arrive, and transcribing live from a
fake microphone (a WAV file Chromium plays as the capture device). The live endpoint's bounds
and protocol errors are tested without a browser in test_web_live.py."""
from __future__ import annotations

import io
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client_models import loader_fixture, require_servicer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients" / "web"))

import demo  # noqa: E402  (clients/web/demo.py)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


loaded = loader_fixture()  # loaded(kind) -> model name


@pytest.fixture(scope="module")
def web(grpc_server):
    server = demo.make_server(grpc_server.address, port=0)
    demo.serve_in_thread(server)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    server.client.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def _post(url: str, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def _events(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# --- the HTTP bridge ------------------------------------------------------------------------

def test_bridge_serves_the_page_and_models(web, loaded):
    vit = loaded("vit")
    with urllib.request.urlopen(web + "/", timeout=10) as response:
        page = response.read().decode()
    assert "Speech recognition" in page and "Image classification" in page and "Text generation" in page
    with urllib.request.urlopen(web + "/api/models", timeout=10) as response:
        models = json.load(response)["models"]
    assert {"name": vit, "task": "TASK_IMAGE_CLASSIFICATION"}.items() <= next(m for m in models if m["name"] == vit).items()


def test_bridge_classifies_and_reports_errors(web, loaded, photo):
    vit = loaded("vit")
    status, body, kind = _post(f"{web}/api/classify-image?model={vit}&top_k=2", photo.read_bytes())
    assert status == 200 and kind.startswith("application/json")
    assert [l["label"][:6] for l in json.loads(body)["labels"]] == ["class_", "class_"]
    status, body, _ = _post(f"{web}/api/classify-image?model={vit}", b"not an image")
    assert status == 400 and json.loads(body)["code"] == "INVALID_ARGUMENT"
    status, body, _ = _post(f"{web}/api/classify-image?model=missing", photo.read_bytes())
    assert status == 404 and json.loads(body)["reason"] == "MODEL_NOT_FOUND"
    status, _, _ = _post(f"{web}/api/nothing", b"")
    assert status == 404


def test_bridge_streams_generation_as_server_sent_events(web, loaded):
    require_servicer("text_generation")
    gpt2 = loaded("gpt2")
    status, body, kind = _post(f"{web}/api/generate", json.dumps(
        {"prompt": "The quick", "model": gpt2, "max_new_tokens": 4, "seed": 1}).encode(), "application/json")
    assert status == 200 and kind.startswith("text/event-stream")
    events = _events(body)
    assert [name for name, _ in events].count("token") == events[-1][1]["generated_tokens"]
    assert events[-1][0] == "done"
    status, _, _ = _post(f"{web}/api/generate", b"{not json", "application/json")
    assert status == 400
    status, body, _ = _post(f"{web}/api/generate", json.dumps({"prompt": "x", "model": "missing"}).encode())
    assert status == 200 and _events(body)[-1][0] == "error" and _events(body)[-1][1]["code"] == "NOT_FOUND"


def test_bridge_says_when_the_grpc_server_is_unreachable():
    server = demo.make_server("127.0.0.1:1", port=0, timeout=5)
    demo.serve_in_thread(server)
    try:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/api/models", timeout=30)
            raise AssertionError("expected HTTP 503")
        except urllib.error.HTTPError as error:
            assert error.code == 503 and json.load(error)["code"] == "UNAVAILABLE"
    finally:
        server.shutdown()
        server.server_close()


# --- in a real browser ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> Path:
    """What the fake microphone plays (Chromium loops it): speech-like audio at 16 kHz."""
    import soundfile

    from wav2vec2_checkpoints import audio

    path = tmp_path_factory.mktemp("mic") / "microphone.wav"
    soundfile.write(path, audio(4.0, seed=5), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(microphone_wav):
    driver = _chromium(microphone_wav)
    yield driver
    driver.quit()


def _chromium(microphone_wav: Path):
    """Headless Chromium whose microphone plays `microphone_wav` in a loop (permission granted)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={microphone_wav}", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def _wait(driver, condition, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def test_browser_uploads_an_image_and_sees_labels(browser, web, loaded, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    vit = loaded("vit")
    browser.get(web + "/")
    _wait(browser, lambda d: "connected" in _text(d, "server-status"))
    Select(browser.find_element(By.ID, "image-model")).select_by_value(vit)
    browser.find_element(By.ID, "image-top-k").clear()
    browser.find_element(By.ID, "image-top-k").send_keys("3")
    browser.find_element(By.ID, "image-file").send_keys(str(photo))
    browser.find_element(By.ID, "image-run").click()
    _wait(browser, lambda d: _text(d, "image-status").startswith("done"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#image-result tbody tr")
    labels = [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows]
    assert len(labels) == 3 and all(label.startswith("class_") for label in labels)
    # A text file is refused with the server's reason, and the page stays usable.
    bad = photo.with_name("notes.txt")
    bad.write_text("not an image")
    browser.find_element(By.ID, "image-file").send_keys(str(bad))
    browser.find_element(By.ID, "image-run").click()
    _wait(browser, lambda d: "INVALID_ARGUMENT" in _text(d, "image-status"))


def test_browser_streams_generated_text(browser, web, loaded):
    require_servicer("text_generation")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    gpt2 = loaded("gpt2")
    browser.get(web + "/")
    _wait(browser, lambda d: len(Select(d.find_element(By.ID, "gen-model")).options) > 1)
    Select(browser.find_element(By.ID, "gen-model")).select_by_value(gpt2)
    browser.find_element(By.ID, "gen-max").clear()
    browser.find_element(By.ID, "gen-max").send_keys("6")
    browser.find_element(By.ID, "gen-run").click()
    _wait(browser, lambda d: _text(d, "gen-status").startswith("done"))
    assert "tokens" in _text(browser, "gen-status")
    assert browser.find_element(By.ID, "gen-text").get_attribute("textContent")


def test_browser_streams_segments_from_a_scripted_server(browser, tmp_path):
    """The page's streaming path (SSE, interim segments replaced by id, the final transcript)
    against the scripted gRPC server, whatever the state of the real ASR servicer."""
    import soundfile
    from selenium.webdriver.common.by import By

    from client_fakes import FakeServer

    fake = FakeServer()
    bridge = demo.make_server(fake.address, port=0, timeout=30)
    demo.serve_in_thread(bridge)
    path = tmp_path / "talk.wav"
    soundfile.write(path, np.zeros(48000, dtype=np.float32), 16000)
    try:
        browser.get(f"http://127.0.0.1:{bridge.server_port}/")
        browser.find_element(By.ID, "asr-file").send_keys(str(path))
        browser.find_element(By.ID, "asr-run").click()
        _wait(browser, lambda d: _text(d, "asr-status").startswith("done"))
        items = browser.find_elements(By.CSS_SELECTOR, "#asr-segments li")
        assert [item.text for item in items] == ["[00:00.00 → 00:01.00] part 0", "[00:01.00 → 00:02.00] part 1",
                                                 "[00:02.00 → 00:03.00] part 2"]
        assert not browser.find_elements(By.CSS_SELECTOR, "#asr-segments li.interim")
        assert _text(browser, "asr-transcript") == "part 0 part 1 part 2"
        assert "3.0 s of audio, language en" in _text(browser, "asr-status")
        assert fake.requests[-1].audio.data == path.read_bytes()
    finally:
        bridge.shutdown()
        bridge.server_close()
        bridge.client.close()
        fake.stop()


def test_browser_uploads_audio_and_sees_the_transcript(browser, web, loaded, tmp_path):
    require_servicer("speech_recognition")
    import soundfile
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from wav2vec2_checkpoints import audio

    ctc = loaded("ctc")
    path = tmp_path / "speech.wav"
    soundfile.write(path, audio(3.0).astype(np.float32), 16000)
    expected = loaded.client.transcribe(str(path), model=ctc).transcription.text.strip()
    browser.get(web + "/")
    _wait(browser, lambda d: len(Select(d.find_element(By.ID, "asr-model")).options) > 1)
    Select(browser.find_element(By.ID, "asr-model")).select_by_value(ctc)
    Select(browser.find_element(By.ID, "asr-timestamps")).select_by_value("char")
    browser.find_element(By.ID, "asr-file").send_keys(str(path))
    browser.find_element(By.ID, "asr-run").click()
    _wait(browser, lambda d: _text(d, "asr-status").startswith("done"))
    assert "3.0 s of audio" in _text(browser, "asr-status")
    assert browser.find_element(By.ID, "asr-transcript").get_attribute("textContent") == expected
    segments = browser.find_elements(By.CSS_SELECTOR, "#asr-segments li")
    assert all("→" in s.text for s in segments)


class RecordingClient:
    """The bridge's client, keeping every live chunk the bridge forwards (and its rate), so a
    test can send the same audio to the server itself."""

    def __init__(self, client) -> None:
        self.client, self.chunks, self.rates = client, [], []

    def transcribe_live(self, chunks, **options):
        self.rates.append(options["sampling_rate"])

        def kept():
            for chunk in chunks:
                self.chunks.append(chunk)
                yield chunk

        return self.client.transcribe_live(kept(), **options)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


@pytest.fixture()
def recording_bridge(grpc_server):
    """A bridge whose client keeps the live chunks it forwards: (url, RecordingClient)."""
    bridge = demo.make_server(grpc_server.address, port=0, timeout=60)
    recording = bridge.client = RecordingClient(bridge.client)
    demo.serve_in_thread(bridge)
    yield f"http://127.0.0.1:{bridge.server_port}", recording
    bridge.shutdown()
    bridge.server_close()
    recording.client.close()


def _record_live(browser, web: str, model: str, seconds: float, before_start: str = "",
                 chunk_length_s: str = "1.5") -> set[str]:
    """One live session in the page: starts the (fake) microphone, waits for interim text,
    stops after `seconds` of audio and waits for "done". Returns the ids of the interim
    segments shown before the stop. `before_start` is script run on the loaded page first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(web + "/")
    _wait(browser, lambda d: len(Select(d.find_element(By.ID, "asr-model")).options) > 1)
    if before_start:
        browser.execute_script(before_start)
    Select(browser.find_element(By.ID, "asr-model")).select_by_value(model)
    browser.find_element(By.ID, "asr-chunk").send_keys(chunk_length_s)
    browser.find_element(By.ID, "asr-record").click()
    _wait(browser, lambda d: _text(d, "asr-status").startswith("listening"))
    # Interim text while the microphone is still open.
    _wait(browser, lambda d: any(li.text.split("] ", 1)[-1].strip()
                                 for li in d.find_elements(By.CSS_SELECTOR, "#asr-segments li.interim")))
    interims = browser.find_elements(By.CSS_SELECTOR, "#asr-segments li.interim")
    interim_ids = {li.get_attribute("data-id") for li in interims}
    _wait(browser, lambda d: "s heard" in _text(d, "asr-status")
          and float(_text(d, "asr-status").split("… ")[1].split(" s")[0]) >= seconds)
    assert browser.find_element(By.ID, "asr-record").text == "■ Stop"
    browser.find_element(By.ID, "asr-record").click()
    _wait(browser, lambda d: _text(d, "asr-status").startswith("done"))
    assert browser.find_element(By.ID, "asr-record").text == "● Live from microphone"
    return interim_ids


def _direct_live_text(loaded, recording: RecordingClient, model: str) -> str:
    """The server's final text for the chunks the bridge forwarded, sent by the test itself."""
    messages = list(loaded.client.transcribe_live(iter(recording.chunks), sampling_rate=recording.rates[-1],
                                                  model=model, chunk_length_s=1.5))
    return messages[-1].done.transcription.text.strip()


def test_browser_transcribes_live_from_the_microphone(browser, recording_bridge, loaded):
    """Live mode: the fake microphone (a WAV file) streams through the bridge's WebSocket to
    StreamingTranscribe; interim text shows while recording, final segments replace it, and
    the final text is the server's for the same audio sent directly and uploaded as a file."""
    require_servicer("speech_recognition")
    import soundfile
    from selenium.webdriver.common.by import By

    ctc = loaded("ctc")
    web, recording = recording_bridge
    interim_ids = _record_live(browser, web, ctc, 3.0)
    # Final segments replaced the interim ones (same ids), and none is left interim.
    assert not browser.find_elements(By.CSS_SELECTOR, "#asr-segments li.interim")
    finals = browser.find_elements(By.CSS_SELECTOR, "#asr-segments li")
    assert finals and all("→" in li.text and "…]" not in li.text for li in finals)
    assert interim_ids & {li.get_attribute("data-id") for li in finals}
    transcript = browser.find_element(By.ID, "asr-transcript").get_attribute("textContent")

    # The same audio, sent to StreamingTranscribe directly and uploaded as a file.
    rate, = recording.rates
    assert rate == 16000  # the page's AudioContext resampled the microphone to the model's rate
    samples = np.frombuffer(b"".join(recording.chunks), "<f4")
    assert 3.0 <= len(samples) / rate < 60 and np.abs(samples).max() > 0.01  # the WAV, not silence
    assert transcript == _direct_live_text(loaded, recording, ctc)
    assert f"{len(samples) / rate:.1f} s of audio" in _text(browser, "asr-status")
    upload = io.BytesIO()
    soundfile.write(upload, samples, rate, format="WAV", subtype="FLOAT")
    status, body, _ = _post(f"{web}/api/transcribe?model={ctc}&chunk_length_s=1.5", upload.getvalue())
    assert status == 200
    assert _events(body)[-1][1]["transcription"]["text"].strip() == transcript

    # Errors reach the page: a model unloaded since the page listed it, then a denied microphone.
    browser.execute_script("const s = document.getElementById('asr-model'); s.add(new Option('gone', 'gone'));"
                           "s.value = 'gone';")
    browser.find_element(By.ID, "asr-record").click()
    _wait(browser, lambda d: "NOT_FOUND" in _text(d, "asr-status"))
    _wait(browser, lambda d: d.find_element(By.ID, "asr-record").text == "● Live from microphone")
    browser.execute_script("navigator.mediaDevices.getUserMedia = () => "
                           "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));")
    browser.find_element(By.ID, "asr-record").click()
    _wait(browser, lambda d: "microphone access was denied" in _text(d, "asr-status"))
    assert "error" in browser.find_element(By.ID, "asr-status").get_attribute("class")


def test_browser_live_falls_back_without_audio_worklet_or_resampling(browser, recording_bridge, loaded):
    """A browser without AudioWorklet and without a 16 kHz AudioContext for the microphone:
    the page captures with a ScriptProcessor at the device's rate and the server resamples."""
    require_servicer("speech_recognition")
    ctc = loaded("ctc")
    web, recording = recording_bridge
    _record_live(browser, web, ctc, 2.0, before_start="""
        Object.defineProperty(BaseAudioContext.prototype, 'audioWorklet', { get: () => undefined });
        const Native = window.AudioContext;
        window.AudioContext = class extends Native {
          constructor(options) {
            if (options?.sampleRate) throw new DOMException('no resampling here', 'NotSupportedError');
            super();
          }
        };""")
    assert recording.rates[-1] != 16000
    # The ScriptProcessor's 4096-frame blocks (an AudioWorklet delivers 128 frames at a time).
    assert all(len(chunk) % (4096 * 4) == 0 for chunk in recording.chunks)
    transcript = browser.find_element("id", "asr-transcript").get_attribute("textContent")
    assert transcript == _direct_live_text(loaded, recording, ctc)


def test_browser_transcribes_real_speech_live(grpc_server, tmp_path):
    """Whisper tiny.en (the embedded real weights) live on spoken English: the fake
    microphone loops a sentence with pauses around it; after two loops' worth of audio the
    final transcript holds the sentence at least once, and no interim text is left."""
    require_servicer("speech_recognition")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile
    from selenium.webdriver.common.by import By

    from pipeserve.checkpoints.embedded import embedded_model_dir
    from pipeserve.inputs.audio import load_audio_input
    from pipeserve_client import Client
    from whisper_checkpoints import speak

    sentence = load_audio_input(data=speak("The quick brown fox jumps over the lazy dog.", tmp_path / "s.wav")).numpy()
    loop = np.concatenate([np.zeros(8000, np.float32), sentence, np.zeros(24000, np.float32)])
    soundfile.write(tmp_path / "mic.wav", loop, 16000, subtype="PCM_16")
    with Client(grpc_server.address, timeout=300) as client:
        whisper = client.models.load(str(embedded_model_dir("automatic-speech-recognition"))).name
        bridge = demo.make_server(grpc_server.address, port=0, timeout=120)
        recording = bridge.client = RecordingClient(bridge.client)
        demo.serve_in_thread(bridge)
        driver = _chromium(tmp_path / "mic.wav")
        try:
            _record_live(driver, f"http://127.0.0.1:{bridge.server_port}", whisper, 2 * len(loop) / 16000,
                         chunk_length_s="")
            assert not driver.find_elements(By.CSS_SELECTOR, "#asr-segments li.interim")
            transcript = driver.find_element(By.ID, "asr-transcript").get_attribute("textContent")
            # Not word-exact: tiny.en hears espeak's "brown fox" as "roundfark" and "dog" now and
            # then as "nog", offline on the original WAV too; the words it always gets are checked,
            # in the live transcript and in the upload of the same recorded audio.
            samples = np.frombuffer(b"".join(recording.chunks), "<f4")
            upload = client.transcribe(samples, sampling_rate=recording.rates[-1], model=whisper).transcription.text
            for text in (transcript, upload):
                words = "".join(c for c in text.lower() if c.isalpha() or c == " ")
                assert "the quick" in words and "jump over the lazy" in words, text
        finally:
            driver.quit()
            bridge.shutdown()
            bridge.server_close()
            recording.client.close()
            client.models.unload(whisper)
