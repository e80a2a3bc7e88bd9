"""audio.py: decoding of files and raw PCM, our windowed-sinc resampler, typed errors."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeserve.inputs import audio
from pipeserve.errors import InputTooLarge, InvalidInput, UnsupportedFormat


def _tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000, 44101])
def test_resample_tone_is_band_limited_and_accurate(orig):
    x = torch.from_numpy(_tone(orig))
    y = audio.resample(x, orig, 16000)
    assert y.shape[-1] == math.ceil(16000 * x.shape[-1] / orig)
    ref = torch.from_numpy(_tone(16000))[: y.shape[-1]]
    # Away from the edges (where the filter sees zero padding) the tone is preserved.
    assert (y - ref)[300:-300].abs().max().item() < 2e-3


def test_resample_removes_content_above_new_nyquist():
    x = torch.from_numpy(_tone(48000, freq=12000.0))  # above 8 kHz: must vanish at 16 kHz
    y = audio.resample(x, 48000, 16000)
    assert y[300:-300].abs().max().item() < 1e-2


def test_polyphase_and_direct_paths_agree():
    x = torch.randn(2, 9000)
    orig, new = 441, 160
    base = min(orig, new) * audio.ROLLOFF
    width = math.ceil(audio.LOWPASS_FILTER_WIDTH * orig / base)
    a = audio._resample_polyphase(x, orig, new, base, width)[..., :3266]
    b = audio._resample_direct(x, orig, new, base, width)[..., :3266]
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS")])
def test_decode_formats_keep_channels_then_downmix(fmt, subtype):
    left, right = _tone(22050), _tone(22050, freq=220.0)
    data = _encode(np.stack([left, right], 1), 22050, fmt, subtype)
    wave, rate = audio.decode_audio(data)
    assert rate == 22050 and wave.shape[0] == 2
    mono = audio.load_audio_input(data=data)
    assert mono.dtype == torch.float32 and mono.dim() == 1
    assert abs(mono.shape[0] - 16000) <= 1


def test_raw_pcm_int16_and_float32_match():
    x = _tone(16000)
    ints = (x * 32768).round().clip(-32768, 32767).astype("<i2")
    a = audio.load_audio_input(samples=ints.tobytes(), fmt="int16", sample_rate=16000, channels=1)
    b = audio.load_audio_input(samples=x.astype("<f4").tobytes(), fmt="float32", sample_rate=16000, channels=1)
    assert (a - b).abs().max().item() < 1e-4
    stereo = np.stack([x, x], 1).astype("<f4").tobytes()
    c = audio.load_audio_input(samples=stereo, fmt="SAMPLE_FORMAT_FLOAT32_LE", sample_rate=16000, channels=2)
    assert torch.equal(c, b)


@pytest.mark.parametrize("kwargs,error", [
    (dict(data=b""), InvalidInput),
    (dict(data=b"\x00\x01garbage" * 50), UnsupportedFormat),
    (dict(data=b"%PDF-1.4\n" + b"x" * 200), UnsupportedFormat),
    (dict(samples=b"", fmt="float32", sample_rate=16000), InvalidInput),
    (dict(samples=b"\x00" * 8, fmt="float32", sample_rate=0), InvalidInput),
    (dict(samples=b"\x00" * 7, fmt="float32", sample_rate=16000), InvalidInput),
    (dict(samples=b"\x00" * 8, fmt="mp3", sample_rate=16000), UnsupportedFormat),
    (dict(samples=np.array([0.0, np.nan], "<f4").tobytes(), fmt="float32", sample_rate=16000), InvalidInput),
    (dict(samples=np.array([np.inf, 0.0], "<f4").tobytes(), fmt="float32", sample_rate=16000), InvalidInput),
    (dict(samples=b"\x00" * 16000 * 2 * 11, fmt="int16", sample_rate=16000, max_seconds=10.0), InputTooLarge),
])
def test_bad_inputs_raise_typed_errors(kwargs, error):
    with pytest.raises(error) as info:
        audio.load_audio_input(**kwargs)
    assert info.value.message


def test_truncated_file_and_long_file_header():
    data = _encode(_tone(16000, seconds=2.0), 16000, "FLAC")
    with pytest.raises(InvalidInput):
        audio.decode_audio(data[:200])
    with pytest.raises(InputTooLarge):
        audio.decode_audio(data, max_seconds=1.0)
