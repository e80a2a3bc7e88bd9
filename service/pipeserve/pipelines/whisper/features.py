"""Whisper's log-mel spectrogram in torch, the same numbers as transformers'
WhisperFeatureExtractor (models/whisper/feature_extraction_whisper.py,
`_torch_extract_fbank_features`, with the filter bank of audio_utils.mel_filter_bank:
slaney mel scale, slaney area normalisation, 0-8 kHz).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop -> 100 frames per second
CHUNK_LENGTH = 30  # seconds per encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100


def _hertz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    # audio_utils.hertz_to_mel(mel_scale="slaney"): linear below 1 kHz, logarithmic above.
    logstep = 27.0 / math.log(6.4)
    mels = 3.0 * freq / 200.0
    return torch.where(freq >= 1000.0, 15.0 + torch.log(freq / 1000.0) * logstep, mels)


def _mel_to_hertz(mels: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    return torch.where(mels >= 15.0, 1000.0 * torch.exp(logstep * (mels - 15.0)), freq)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[1 + n_fft // 2, n_mels] float32 filter bank, computed in float64 as transformers does."""
    num_bins = 1 + n_fft // 2
    mel_min = _hertz_to_mel(torch.tensor(0.0, dtype=torch.float64))
    mel_max = _hertz_to_mel(torch.tensor(8000.0, dtype=torch.float64))
    mel_freqs = torch.linspace(float(mel_min), float(mel_max), n_mels + 2, dtype=torch.float64)
    filter_freqs = _mel_to_hertz(mel_freqs)
    fft_freqs = torch.linspace(0, sample_rate // 2, num_bins, dtype=torch.float64)
    # audio_utils._create_triangular_filter_bank
    filter_diff = torch.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)
    enorm = 2.0 / (filter_freqs[2: n_mels + 2] - filter_freqs[:n_mels])
    return (filters * enorm[None, :]).to(torch.float32)


def pad_or_trim(waveform: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pads (or cuts) the last dimension to `length` samples, as the extractor's
    padding="max_length" + truncation does."""
    n = waveform.shape[-1]
    if n >= length:
        return waveform[..., :length]
    return torch.nn.functional.pad(waveform, (0, length - n))


def _power_spectrum(x: torch.Tensor, frames: int) -> torch.Tensor:
    """|STFT|^2 of x [batch, samples] (centred frames, reflect-padded ends, as the extractor)
    -> [batch, 1 + N_FFT // 2, frames]: the first `frames` frames."""
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    return stft[..., :frames].abs() ** 2


def _padded_power_spectrum(x: torch.Tensor, length: int) -> torch.Tensor:
    """_power_spectrum of x zero-padded to `length` samples (the last frame dropped), without
    transforming the padding: a short clip in a 30 s window is mostly zeros, and a frame that
    sees only zeros has power exactly 0. A frame t spans samples [t*HOP - N_FFT/2, t*HOP +
    N_FFT/2); cut at `cut` >= n + N_FFT/2 + 1 samples, the frames of the cut signal are those of
    the padded one (their reflected right end mirrors zeros in both) and every later frame lies
    wholly in the padding. Same numbers as transforming the whole window
    (tests/test_whisper_features.py), in a fraction of the time for short clips."""
    n = x.shape[-1]
    frames = length // HOP_LENGTH
    cut = n + N_FFT // 2 + 1
    if cut + N_FFT // 2 >= length:
        return _power_spectrum(pad_or_trim(x, length), frames)
    head = _power_spectrum(torch.nn.functional.pad(x, (0, cut - n)), min(frames, cut // HOP_LENGTH + 1))
    power = head.new_zeros(x.shape[0], head.shape[1], frames)
    power[..., :head.shape[-1]] = head
    return power


def log_mel_spectrogram(waveform: torch.Tensor, n_mels: int = 80, *, pad_to: int | None = N_SAMPLES) -> torch.Tensor:
    """[batch, samples] or [samples] float32 -> [batch, n_mels, frames] (or [n_mels, frames]).

    With pad_to=N_SAMPLES each input becomes exactly one 30 s window (3000 frames), as the
    pipeline feeds the model. The clamp to max-8 is per example, like the extractor's batch path.
    """
    squeeze = waveform.dim() == 1
    x = waveform[None] if squeeze else waveform
    x = x.to(torch.float32)
    if pad_to is not None and x.shape[-1] < pad_to:
        magnitudes = _padded_power_spectrum(x, pad_to)  # [batch, 201, frames]
    else:
        if pad_to is not None:
            x = pad_or_trim(x, pad_to)
        magnitudes = _power_spectrum(x, x.shape[-1] // HOP_LENGTH)  # the last frame is dropped
    filters = mel_filters(n_mels).to(x.device)
    mel = filters.T @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[0] if squeeze else log_spec
