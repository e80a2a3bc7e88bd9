"""A decoded window's tokens cut into segments with absolute times: generation_whisper.
_retrieve_segment, and the time units of Whisper's tokens and frames."""
from __future__ import annotations

from dataclasses import dataclass

TIME_PRECISION = 0.02  # seconds per timestamp token: 30 s / 1500 encoder positions
INPUT_STRIDE = 2  # mel frames per encoder position (conv2 stride)
FRAME_SECONDS = 0.01  # seconds per mel frame (hop 160 at 16 kHz)


@dataclass
class Segment:
    """A decoded segment with absolute times (seconds)."""

    start: float
    end: float
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    token_times: list[float] | None = None  # end time of each token, for word timings
    token_probs: list[float] | None = None  # probability of each token, for word probabilities
    time_offset: float = 0.0  # where the window its timestamp tokens count from begins


def retrieve_segments(seq: list[int], tb: int, time_offset: float, seek_num_frames: int,
                      extra: dict) -> tuple[list[Segment], int, list[tuple[int, int]]]:
    """generation_whisper._retrieve_segment -> (segments, frames consumed, token index ranges)."""
    is_ts = [t >= tb for t in seq]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
    segments, ranges = [], []
    if cuts:
        if single_ending:
            cuts.append(len(seq))
        else:
            cuts[-1] += 1
        last = 0
        for i, cut in enumerate(cuts):
            part = seq[last:cut]
            end_index = -1 if (i < len(cuts) - 1 or single_ending) else -2
            segments.append(Segment(start=time_offset + (part[0] - tb) * TIME_PRECISION,
                                    end=time_offset + (part[end_index] - tb) * TIME_PRECISION, tokens=part,
                                    time_offset=time_offset, **extra))
            ranges.append((last, cut))
            last = cut
        consumed = seek_num_frames if single_ending else (seq[last - 2] - tb) * INPUT_STRIDE
    else:
        stamps = [t for t in seq if t >= tb]
        last_pos = int(seek_num_frames * FRAME_SECONDS / TIME_PRECISION)
        if stamps and stamps[-1] != tb:
            last_pos = stamps[-1] - tb
        segments.append(Segment(start=time_offset, end=time_offset + last_pos * TIME_PRECISION, tokens=seq,
                                time_offset=time_offset, **extra))
        ranges.append((0, len(seq)))
        consumed = seek_num_frames
    return segments, consumed, ranges
