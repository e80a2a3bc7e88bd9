"""Whisper's log-mel features of a clip shorter than its 30 s window are computed without
transforming the zero padding (features._padded_power_spectrum); they must be bitwise those of
transforming the whole padded window, for every length and batch, speech-like or not."""
from __future__ import annotations

import pytest
import torch

from pipeserve.pipelines.whisper.features import (HOP_LENGTH, N_FFT, N_SAMPLES, log_mel_spectrogram,
                                                  mel_filters, pad_or_trim)


def _whole_window(waveform: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """The straightforward computation: pad to 30 s, transform every frame."""
    x = pad_or_trim(waveform[None].to(torch.float32))
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    mel = mel_filters(n_mels).T @ (stft[..., :-1].abs() ** 2)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return ((log_spec + 4.0) / 4.0)[0]


@pytest.mark.parametrize("samples", [1, 150, 199, 200, 201, 401, 1000, 16000 + 37, 4 * 16000 + 159,
                                     N_SAMPLES - 601, N_SAMPLES - 400, N_SAMPLES - 1, N_SAMPLES])
def test_short_clip_features_equal_the_whole_window_transform(samples):
    torch.manual_seed(samples)
    tone = torch.sin(torch.arange(samples) * 0.05) * 0.3 + torch.randn(samples) * 0.05
    got = log_mel_spectrogram(tone)
    assert got.shape == (80, 3000)
    assert torch.equal(got, _whole_window(tone))


def test_a_batch_of_short_clips_equals_each_alone():
    torch.manual_seed(0)
    batch = torch.randn(3, 5 * 16000) * 0.1
    batch[1, 16000:] = 0  # a clip whose own end is silence
    together = log_mel_spectrogram(batch, 128)
    for row, clip in zip(together, batch):
        assert torch.equal(row, _whole_window(clip, 128))


def test_longer_than_a_window_keeps_every_frame():
    x = torch.randn(N_SAMPLES + 16000) * 0.1
    assert log_mel_spectrogram(x, pad_to=None).shape == (80, (N_SAMPLES + 16000) // HOP_LENGTH)
    assert torch.equal(log_mel_spectrogram(x), _whole_window(x))  # cut to the window
