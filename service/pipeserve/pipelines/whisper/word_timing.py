"""Word-level times: the cross-attention of the alignment heads over a teacher-forced pass,
median-filtered and aligned to the audio by dynamic time warping (generation_whisper.
_extract_token_timestamps, _dynamic_time_warping, _median_filter)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .generation_settings import GenerationSettings
from .segments import TIME_PRECISION


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """generation_whisper._median_filter along the last dimension."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """generation_whisper._dynamic_time_warping (same tie-breaking), one column at a time."""
    n, m = matrix.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = matrix[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = n, m
    trace[0, :] = 2
    trace[:, 0] = 1
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(text)[::-1], np.array(time)[::-1]


def token_times(model, encoder_out: torch.Tensor, prompt: list[int], generated: list[int],
                s: GenerationSettings, num_frames: int | None,
                crop_twice: bool = False) -> tuple[list[float], list[float]]:
    """generation_whisper._extract_token_timestamps for one row: a time (s, window-relative) per
    position of prompt + generated (prompt positions are 0); and, per position, the token's
    probability in the same teacher-forced pass, as openai-whisper's timing.find_alignment
    (and faster-whisper) compute it: softmax over the text vocabulary (ids below <|endoftext|>),
    the probability of the token that was decoded (0 for the prompt and special tokens)."""
    tokens = torch.tensor([prompt + generated[:-1]], device=encoder_out.device)
    attentions, logits = model.decoder.cross_attentions(tokens, encoder_out)
    text_probs = logits[0, len(prompt) - 1:, : s.eos_token_id].float().softmax(dim=-1)
    probs = [0.0] * len(prompt) + [float(text_probs[k, t]) if t < s.eos_token_id else 0.0
                                   for k, t in enumerate(generated)]
    weights = torch.stack([attentions[layer][0, head] for layer, head in s.alignment_heads]).float()
    if num_frames is not None:
        weights = weights[..., : num_frames // 2]
        if crop_twice:
            # _extract_token_timestamps slices [..., :num_frames // 2] for a batch whose rows share
            # one count and again in its per-row loop. Only a window that starts past the end of
            # the audio (a model predicting timestamps beyond it) has a negative count, and a
            # negative slice drops frames from the end each time: the second slice matters then.
            weights = weights[..., : num_frames // 2]
    weights = weights[:, len(prompt):, :]  # [heads, generated - 1, frames]
    out = [0.0] * len(prompt)
    if weights.shape[1] == 0:
        return out + [0.0] * len(generated), probs
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, s.median_filter_width).mean(dim=0)
    text_idx, time_idx = dynamic_time_warping(-weights.cpu().double().numpy())
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = (time_idx[jumps] * TIME_PRECISION).tolist()
    return out + jump_times + [jump_times[-1]], probs
