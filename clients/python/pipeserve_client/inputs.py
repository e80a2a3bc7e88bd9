"""Client-side inputs -> the contracts' ImageInput / AudioInput.

Accepted, as transformers.pipeline accepts them: a local path (str or os.PathLike), the
bytes of an encoded file, an http(s):// or file:// URI (the server fetches it only where its
allowlist permits), a PIL image, and raw audio as a numpy array with its sampling rate (or
the pipeline's {"raw": array, "sampling_rate": rate} dict)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Union

from pipeserve.v1 import common_pb2

from .errors import InputError, InputFileError

_URI = re.compile(r"^(https?|file)://", re.IGNORECASE)

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]  # Any: PIL.Image.Image, numpy array
AudioLike = Union[str, os.PathLike, bytes, bytearray, memoryview, dict, Any]  # Any: numpy array


def read_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a local file, with a message naming the file when it cannot be read."""
    p = Path(path).expanduser()
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{what} file not found: {p}") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} path is a directory, not a file: {p}") from None
    except PermissionError:
        raise InputFileError(f"{what} file is not readable (permission denied): {p}") from None
    except OSError as exc:
        raise InputFileError(f"cannot read {what} file {p}: {exc.strerror or exc}") from None


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def image_input(image: ImageLike) -> common_pb2.ImageInput:
    data = _as_bytes(image)
    if data is not None:
        return common_pb2.ImageInput(data=data)
    if isinstance(image, str) and _URI.match(image):
        return common_pb2.ImageInput(uri=image)
    if isinstance(image, (str, os.PathLike)):
        return common_pb2.ImageInput(data=read_file(image, "image"))
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image, without importing PIL
        return common_pb2.ImageInput(data=_encode_pil(image))
    if hasattr(image, "__array__") and getattr(image, "ndim", 0) in (2, 3):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            raise InputError("numpy images need pillow installed") from None
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise InputError(f"a numpy image must be uint8 (H, W) or (H, W, C), got {array.dtype}")
        return common_pb2.ImageInput(data=_encode_pil(Image.fromarray(array)))
    raise InputError(f"cannot use {type(image).__name__} as an image: pass a path, bytes, a URI or a PIL image")


def _encode_pil(image: Any) -> bytes:
    # PNG is lossless, so the server sees exactly the pixels the caller holds.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def raw_audio(samples: Any, sampling_rate: int | None) -> common_pb2.RawAudio:
    """A numpy array -> RawAudio: float arrays as float32 PCM, int16 as int16 PCM; a 2-D
    array is (frames, channels) and is interleaved frame by frame."""
    import numpy as np

    if not sampling_rate or int(sampling_rate) <= 0:
        raise InputError("raw audio samples need sampling_rate= (in hertz)")
    array = np.asarray(samples)
    if array.ndim not in (1, 2) or array.size == 0:
        raise InputError(f"raw audio must be a non-empty 1-D array or (frames, channels), got shape {array.shape}")
    channels = 1 if array.ndim == 1 else array.shape[1]
    if array.dtype == np.int16:
        fmt, data = common_pb2.SAMPLE_FORMAT_INT16_LE, array.astype("<i2").tobytes()
    elif np.issubdtype(array.dtype, np.floating):
        fmt, data = common_pb2.SAMPLE_FORMAT_FLOAT32_LE, array.astype("<f4").tobytes()
    else:
        raise InputError(f"raw audio must be float (-1..1) or int16 samples, got {array.dtype}")
    return common_pb2.RawAudio(samples=data, format=fmt, sample_rate=int(sampling_rate), channels=channels)


def audio_input(audio: AudioLike, sampling_rate: int | None = None) -> common_pb2.AudioInput:
    data = _as_bytes(audio)
    if data is not None:
        return common_pb2.AudioInput(data=data)
    if isinstance(audio, str) and _URI.match(audio):
        return common_pb2.AudioInput(uri=audio)
    if isinstance(audio, (str, os.PathLike)):
        return common_pb2.AudioInput(data=read_file(audio, "audio"))
    if isinstance(audio, dict):
        # transformers' {"raw": array, "sampling_rate": rate} (or "array", as datasets names it).
        samples = audio.get("raw", audio.get("array"))
        if samples is None:
            raise InputError('an audio dict needs "raw" (or "array") samples and "sampling_rate"')
        return common_pb2.AudioInput(raw=raw_audio(samples, audio.get("sampling_rate", sampling_rate)))
    if hasattr(audio, "__array__"):
        return common_pb2.AudioInput(raw=raw_audio(audio, sampling_rate))
    raise InputError(f"cannot use {type(audio).__name__} as audio: pass a path, bytes, a URI or a numpy array")
