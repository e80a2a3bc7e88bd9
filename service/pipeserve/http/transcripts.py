"""A pipeserve.v1.Transcription in OpenAI's response formats: json, text, srt, vtt and
verbose_json (segments, and words when asked for word timestamps)."""
from __future__ import annotations

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _clock(seconds: float, decimal: str) -> str:
    """1.5 -> 00:00:01,500 (srt) or 00:00:01.500 (vtt)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _end(segment, duration_s: float) -> float:
    # A segment's end is optional (the last window may end without a timestamp token).
    return segment.end_s if segment.HasField("end_s") else max(segment.start_s, duration_s)


def srt(transcription) -> str:
    blocks = [f"{n}\n{_clock(s.start_s, ',')} --> {_clock(_end(s, transcription.duration_s), ',')}\n{s.text.strip()}\n"
              for n, s in enumerate(transcription.segments, start=1)]
    return "\n".join(blocks)


def vtt(transcription) -> str:
    cues = [f"{_clock(s.start_s, '.')} --> {_clock(_end(s, transcription.duration_s), '.')}\n{s.text.strip()}\n"
            for s in transcription.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_json(transcription, *, words: bool, segments: bool, task: str) -> dict:
    body: dict = {"task": task, "language": transcription.language, "duration": transcription.duration_s,
                  "text": transcription.text}
    if segments:
        body["segments"] = [{
            "id": n, "seek": 0, "start": s.start_s, "end": _end(s, transcription.duration_s), "text": s.text,
            "tokens": list(s.tokens), "temperature": s.temperature, "avg_logprob": s.avg_logprob,
            "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob,
        } for n, s in enumerate(transcription.segments)]
    if words:
        body["words"] = [{"word": w.text, "start": w.start_s, "end": w.end_s}
                         for s in transcription.segments for w in s.words]
    return body
