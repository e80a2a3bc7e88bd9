"""Audio input -> mono float32 waveform at the model's rate.

Decoding: encoded files through libsndfile (soundfile: WAV, FLAC, OGG/Vorbis/Opus, MP3 and
the rest libsndfile reads), raw PCM (float32 / int16 little-endian, interleaved) by hand.
Resampling: our own windowed-sinc resampler in torch, the same filter as torchaudio's default
`torchaudio.functional.resample` (sinc_interp_hann, lowpass_filter_width=6, rolloff=0.99),
which is what transformers' ASR pipeline calls when an input's rate differs from the model's.
Ported from torchaudio/functional/functional.py `_get_sinc_resample_kernel` and
`_apply_sinc_resample_kernel`; for rate pairs whose polyphase kernel would be huge (coprime
rates such as 44101 -> 16000) the same filter is evaluated directly, output block by block.

Every bad input raises a typed error from pipeserve.errors, never a bare exception.
"""
from __future__ import annotations

import io
import math
from typing import Literal

import torch

from ..errors import InputTooLarge, InvalidInput, UnsupportedFormat

# Whisper / wav2vec2 models are trained on 16 kHz audio.
MODEL_SAMPLE_RATE = 16_000
# Sample rates accepted. Below 4 kHz no speech model has anything to hear, and resampling up
# to 16 kHz multiplies the work per request byte (raw audio at 1 Hz: 6.4 kB would become
# 1,600 s of audio). Raw PCM and live streams stop at 192 kHz (studio rates); encoded files
# may go to 768 kHz (beyond DXD's 352.8 kHz), since their header is read before any sample.
MIN_SAMPLE_RATE = 4_000
MAX_RAW_SAMPLE_RATE = 192_000
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
# Work per request byte for encoded audio: past the floor, an input may decode to at most
# this many samples (frames x channels) per byte. Real codecs stay far below: 16-bit FLAC
# ~1, MP3 at 32 kb/s ~4, Opus at 16 kb/s (decoded at 48 kHz) ~24; FLAC of digital silence
# reaches ~345, and such a file longer than the floor is refused instead of decoded.
MAX_DECODED_SAMPLES_PER_BYTE = 256
DECODED_SAMPLES_FLOOR = 1 << 24  # 64 MiB of float32 (17 min of 16 kHz mono), whatever the file size
_DECODE_BLOCK_FRAMES = 1 << 16
# torchaudio.functional.resample defaults.
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
# Above this many kernel elements (phases x taps) the polyphase conv is replaced by direct
# evaluation; 2**22 floats = 16 MiB.
_MAX_KERNEL_ELEMENTS = 1 << 22

SampleFormat = Literal["float32", "int16"]
_BYTES_PER_SAMPLE = {"float32": 4, "int16": 2}


def decode_audio(data: bytes, *, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Encoded audio file bytes -> (waveform [channels, frames] float32, sample_rate).

    Channels are kept; `downmix` makes mono. The duration limit is checked from the header
    before the samples are decoded, so a 3-hour file is refused without decoding it.
    """
    import soundfile as sf

    if not data:
        raise InvalidInput("audio data is empty", metadata={"field": "audio.data"})
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames, channels = f.samplerate, f.frames, f.channels
            _check_rate_channels(rate, channels, field="audio.data")
            if max_seconds is not None and frames > 0 and frames / rate > max_seconds:
                raise _too_long(frames / rate, max_seconds)
            max_frames = _decodable_frames(len(data), rate, channels, max_seconds)
            if frames > max_frames:
                raise _too_much_per_byte(frames, channels, len(data), max_seconds, rate)
            samples = _read_bounded(f, max_frames, len(data), max_seconds)  # [frames, channels]
    except sf.LibsndfileError as exc:
        text = (getattr(exc, "error_string", "") or str(exc)).strip()
        if "not recognised" in text.lower() or "unknown format" in text.lower():
            raise UnsupportedFormat(
                "audio data is not in a format libsndfile reads (WAV, FLAC, OGG, MP3, ...): " + text,
                metadata={"field": "audio.data"}) from None
        raise InvalidInput(f"audio data cannot be decoded: {text}", metadata={"field": "audio.data"}) from None
    except (RuntimeError, ValueError, TypeError, EOFError) as exc:  # soundfile raises these for some damaged streams
        raise InvalidInput(f"audio data cannot be decoded: {exc}", metadata={"field": "audio.data"}) from None
    waveform = torch.from_numpy(samples).T.contiguous()
    if max_seconds is not None and waveform.shape[-1] / rate > max_seconds:
        raise _too_long(waveform.shape[-1] / rate, max_seconds)
    return waveform, rate


def _decodable_frames(n_bytes: int, rate: int, channels: int, max_seconds: float | None) -> int:
    """The most frames one encoded input of `n_bytes` may decode to."""
    per_byte = max(DECODED_SAMPLES_FLOOR, MAX_DECODED_SAMPLES_PER_BYTE * n_bytes) // channels
    by_length = math.floor(max_seconds * rate) if max_seconds is not None else per_byte
    return min(per_byte, by_length)


def _read_bounded(f, max_frames: int, n_bytes: int, max_seconds: float | None):
    """Reads block by block and stops as soon as the input decodes to more frames than it
    may: a header's frame count can be missing or wrong (streams, damaged files)."""
    import numpy as np

    blocks, total = [], 0
    while True:
        block = f.read(_DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        total += block.shape[0]
        if total > max_frames:
            if max_seconds is not None and total / f.samplerate > max_seconds:
                raise _too_long(total / f.samplerate, max_seconds)
            raise _too_much_per_byte(total, f.channels, n_bytes, max_seconds, f.samplerate)
        blocks.append(block)
    if not blocks:
        return np.zeros((0, f.channels), dtype="float32")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _too_much_per_byte(frames: int, channels: int, n_bytes: int, max_seconds, rate) -> InputTooLarge:
    return InputTooLarge(
        f"{n_bytes} bytes of encoded audio decode to more than {frames * channels:,} samples; at most "
        f"{MAX_DECODED_SAMPLES_PER_BYTE} samples per input byte are decoded beyond the first "
        f"{DECODED_SAMPLES_FLOOR:,} (refused while decoding)",
        metadata={"field": "audio.data", "limit": MAX_DECODED_SAMPLES_PER_BYTE})


def decode_raw_pcm(samples: bytes, fmt: SampleFormat | str, sample_rate: int, channels: int, *,
                   max_seconds: float | None = None, field: str = "audio.raw") -> tuple[torch.Tensor, int]:
    """Raw interleaved little-endian PCM -> (waveform [channels, frames] float32, sample_rate).

    int16 is scaled by 1/32768 (as soundfile and transformers' ffmpeg_read do). `field` names
    the message that carried it in errors ("audio.raw", or "config" for a live stream).
    """
    fmt = _parse_format(fmt)
    channels = int(channels) if channels else 1  # an unset channel count (0) means mono
    _check_rate_channels(sample_rate, channels, max_rate=MAX_RAW_SAMPLE_RATE, field=field)
    samples_field = "audio.samples" if field == "config" else field + ".samples"
    if not samples:
        raise InvalidInput("raw audio samples are empty", metadata={"field": samples_field})
    frame_bytes = _BYTES_PER_SAMPLE[fmt] * channels
    if len(samples) % frame_bytes:
        raise InvalidInput(
            f"raw audio is {len(samples)} bytes, not a whole number of {channels}-channel {fmt} frames "
            f"({frame_bytes} bytes each)", metadata={"field": samples_field})
    frames = len(samples) // frame_bytes
    if max_seconds is not None and frames / sample_rate > max_seconds:
        raise _too_long(frames / sample_rate, max_seconds)
    if fmt == "float32":
        flat = torch.frombuffer(bytearray(samples), dtype=torch.float32)
    else:
        flat = torch.frombuffer(bytearray(samples), dtype=torch.int16).to(torch.float32) / 32768.0
    return flat.view(frames, channels).T.contiguous(), int(sample_rate)


def downmix(waveform: torch.Tensor) -> torch.Tensor:
    """[channels, frames] or [frames] -> mono [frames] (channel mean, as ffmpeg's -ac 1 does for stereo)."""
    if waveform.dim() == 1:
        return waveform
    if waveform.dim() != 2:
        raise InvalidInput(f"audio must be [frames] or [channels, frames], got shape {tuple(waveform.shape)}")
    return waveform.mean(dim=0) if waveform.shape[0] > 1 else waveform[0]


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of the last dimension: torchaudio.functional.resample's default
    filter (Hann-windowed sinc, 6 zero crossings, rolloff 0.99), same output length
    ceil(len * new / orig)."""
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise InvalidInput(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return waveform
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    base_freq = min(orig, new) * ROLLOFF
    # Input samples on each side of an output sample that the filter reaches.
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)
    if new * (2 * width + orig) <= _MAX_KERNEL_ELEMENTS:
        out = _resample_polyphase(flat, orig, new, base_freq, width)
    else:
        out = _resample_direct(flat, orig, new, base_freq, width)
    target = math.ceil(new * shape[-1] / orig)
    return out[..., :target].reshape(shape[:-1] + (-1,))


def _sinc_hann(t: torch.Tensor, base_freq: float, orig: int) -> torch.Tensor:
    """Filter taps at time offsets t (in input-rate periods x base_freq / orig units, float64)."""
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return kernel * window * (base_freq / orig)


def _resample_polyphase(flat: torch.Tensor, orig: int, new: int, base_freq: float, width: int) -> torch.Tensor:
    # torchaudio/functional/functional.py::_get_sinc_resample_kernel (float64 taps -> float32).
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    kernel = _sinc_hann(t * base_freq, base_freq, orig).to(flat.dtype)  # [new, 1, 2*width + orig]
    # ::_apply_sinc_resample_kernel: one output per phase for every `orig` input samples.
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)  # [n, new, blocks]
    return out.transpose(1, 2).reshape(flat.shape[0], -1)


def _resample_direct(flat: torch.Tensor, orig: int, new: int, base_freq: float, width: int,
                     block: int = 4096) -> torch.Tensor:
    """The same filter evaluated per output sample (for coprime rate pairs)."""
    n, length = flat.shape
    total = math.ceil(new * length / orig)
    taps = torch.arange(-width, width + 2)
    padded = torch.nn.functional.pad(flat, (width, width + 2))
    outs = []
    for start in range(0, total, block):
        j = torch.arange(start, min(start + block, total), dtype=torch.float64)
        center = torch.floor(j * orig / new).long()  # input index at or before output time
        index = center[:, None] + taps[None, :]  # [block, taps] original input indices
        t = (index.double() / orig - j[:, None] / new) * base_freq
        weights = _sinc_hann(t, base_freq, orig).to(flat.dtype)
        gathered = padded[:, (index + width).clamp(0, padded.shape[1] - 1)]  # [n, block, taps]
        outs.append((gathered * weights).sum(-1))
    return torch.cat(outs, dim=-1) if outs else flat.new_zeros(n, 0)


def validate_waveform(waveform: torch.Tensor, sample_rate: int, *, min_samples: int = 1,
                      max_seconds: float | None = None) -> None:
    """Empty, non-finite or over-long audio -> typed errors."""
    if waveform.numel() < min_samples or waveform.shape[-1] == 0:
        raise InvalidInput("audio contains no samples", metadata={"field": "audio"})
    if not bool(torch.isfinite(waveform).all()):
        raise InvalidInput("audio contains NaN or infinite samples", metadata={"field": "audio"})
    if max_seconds is not None and waveform.shape[-1] / sample_rate > max_seconds:
        raise _too_long(waveform.shape[-1] / sample_rate, max_seconds)


def join_to_model_rate(blocks: list[torch.Tensor], rate: int) -> torch.Tensor:
    """[channels, frames] blocks of live audio -> one mono MODEL_SAMPLE_RATE waveform, validated
    (NaN / inf refused)."""
    wave = torch.cat(blocks, dim=-1)
    validate_waveform(wave, rate)
    return resample(downmix(wave), rate, MODEL_SAMPLE_RATE)


def load_audio_input(*, data: bytes | None = None, samples: bytes | None = None,
                     fmt: SampleFormat | str | None = None, sample_rate: int | None = None,
                     channels: int | None = None, waveform: torch.Tensor | None = None,
                     target_rate: int = MODEL_SAMPLE_RATE, max_seconds: float | None = None) -> torch.Tensor:
    """One audio input (encoded bytes, raw PCM + format, or a waveform tensor + rate) ->
    validated mono float32 [frames] at `target_rate`."""
    given = sum(x is not None for x in (data, samples, waveform))
    if given != 1:
        raise InvalidInput("exactly one audio source (encoded data, raw samples or a waveform) must be given",
                           metadata={"field": "audio"})
    if data is not None:
        wave, rate = decode_audio(data, max_seconds=max_seconds)
    elif samples is not None:
        if fmt is None or sample_rate is None:
            raise InvalidInput("raw audio needs a sample format and a sample rate", metadata={"field": "audio.raw"})
        wave, rate = decode_raw_pcm(samples, fmt, sample_rate, channels or 1, max_seconds=max_seconds)
    else:
        if sample_rate is None:
            raise InvalidInput("a waveform needs its sample rate", metadata={"field": "audio"})
        _check_rate_channels(sample_rate, 1, field="audio")
        wave, rate = torch.as_tensor(waveform, dtype=torch.float32), int(sample_rate)
    validate_waveform(wave, rate, max_seconds=max_seconds)
    mono = downmix(wave).to(torch.float32)
    return resample(mono, rate, target_rate).contiguous()


def _parse_format(fmt: str) -> str:
    key = str(fmt).lower().removeprefix("sample_format_").removesuffix("_le")
    if key not in _BYTES_PER_SAMPLE:
        raise UnsupportedFormat(f"sample format {fmt!r} is not supported; use float32 or int16 (little-endian)",
                                metadata={"field": "audio.raw.format"})
    return key


def check_rate_channels(sample_rate: int, channels: int, *, max_rate: int = MAX_RAW_SAMPLE_RATE,
                        field: str = "audio.raw") -> None:
    """Refuses a sample rate outside MIN_SAMPLE_RATE..max_rate or a channel count outside
    1..MAX_CHANNELS, naming `field`.sample_rate / `field`.channels (for encoded files, `field`)."""
    encoded = field.endswith(".data")
    if not sample_rate or not MIN_SAMPLE_RATE <= sample_rate <= max_rate:
        raise InvalidInput(f"sample rate must be between {MIN_SAMPLE_RATE} and {max_rate} Hz, got {sample_rate}",
                           metadata={"field": field if encoded else field + ".sample_rate",
                                     "min": MIN_SAMPLE_RATE, "max": max_rate})
    if channels <= 0 or channels > MAX_CHANNELS:
        raise InvalidInput(f"channel count must be between 1 and {MAX_CHANNELS}, got {channels}",
                           metadata={"field": field if encoded else field + ".channels", "max": MAX_CHANNELS})


def _check_rate_channels(sample_rate: int, channels: int, *, max_rate: int = MAX_SAMPLE_RATE,
                         field: str = "audio.data") -> None:
    check_rate_channels(sample_rate, channels, max_rate=max_rate, field=field)


def _too_long(seconds: float, limit: float) -> InputTooLarge:
    return InputTooLarge(f"audio is {seconds:.1f} s long; the limit is {limit:.1f} s",
                         metadata={"field": "audio", "limit": f"{limit:g}"})
