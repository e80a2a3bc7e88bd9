"""Whisper's token decoders: given a step's filtered scores, choose the next tokens and keep the
window's sequences (openai-whisper's TokenDecoder shape: update per step, finalize at the end).
The decoding loop (decoding.decode_window) owns the model, the cache and when to stop waiting.

GreedyDecoder: argmax, or sampling at a temperature (generate_with_fallback's retries).
BeamSearchDecoder: transformers' GenerationMixin._beam_search with early_stopping False, so that
results equal transformers' generate(num_beams=...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WindowResult:
    """One decoded window of one row: generated tokens (with a trailing eos if one was produced)."""

    tokens: list[int]
    logprobs: list[float]
    no_speech_prob: float
    sum_logprob: float | None = None  # beam search: the hypothesis score


@dataclass(frozen=True)
class Step:
    """What a token decoder tells the loop after one update."""

    tokens: list[int]  # the next input token of every decoder row
    reorder: torch.Tensor | None  # cache rows to continue from (row i <- old row reorder[i]), None: unchanged
    done: bool  # nothing more to decode in this window


class TokenDecoder:
    """Chooses tokens for the rows of one window's decoder batch."""

    max_new: int  # the most tokens a row may generate (the loop sizes the cache by it)
    # Its choice needs the scores only near each row's best and the log-probability of the
    # token it takes, which the verified head gives exactly (layers/verified_head.py).
    screened_head_ok = False

    @property
    def sequences(self) -> list[list[int]]:
        """Each decoder row's tokens so far (what the logit filters read)."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """A step's logits [rows, vocab] -> the float32 scores the filters and `update` see."""
        return logits.float()

    def update(self, scores: torch.Tensor) -> Step:
        raise NotImplementedError

    def finalize(self, no_speech: list[float]) -> list[WindowResult]:
        """The window's results, one per input row; `no_speech` is per decoder row."""
        raise NotImplementedError


class GreedyDecoder(TokenDecoder):
    """Per row the best token (temperature 0) or one sampled from softmax(scores / temperature);
    a row that produced eos is finished, and its input is padding from then on."""

    def __init__(self, rows: int, max_new: int, eos: int, pad: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None):
        self.max_new, self.eos, self.pad = max_new, eos, pad
        self.temperature, self.generator = temperature, generator
        self.screened_head_ok = temperature == 0
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.steps = 0

    @property
    def sequences(self) -> list[list[int]]:
        return self.generated

    def update(self, scores: torch.Tensor) -> Step:
        if self.temperature > 0:
            probs = F.softmax(scores / self.temperature, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        else:
            next_tokens = scores.argmax(-1)
        # log_softmax, as transformers' _retrieve_avg_logprobs does; torch.logsumexp over the
        # vocabulary is several unfused passes, much slower than the fused log_softmax kernel.
        chosen = F.log_softmax(scores, dim=-1).gather(-1, next_tokens[:, None])[:, 0].tolist()
        ids = next_tokens.tolist()
        for r, finished in enumerate(self.done):
            if finished:
                ids[r] = self.pad
                continue
            self.generated[r].append(ids[r])
            self.logprobs[r].append(chosen[r])
            self.done[r] = ids[r] == self.eos
        self.steps += 1
        return Step(ids, None, all(self.done) or self.steps >= self.max_new)

    def finalize(self, no_speech: list[float]) -> list[WindowResult]:
        return [WindowResult(tokens, logprobs, p) for tokens, logprobs, p in zip(self.generated, self.logprobs, no_speech)]


class BeamSearchDecoder(TokenDecoder):
    """Beam search for one input row on `beams` decoder rows, as transformers' _beam_search
    (early_stopping False): filters act on log-probabilities (not renormalised), 2 x beams
    candidates per step, a candidate ending in eos (or at max length) among the top `beams`
    becomes a finished hypothesis scored sum / generated_length ** length_penalty, and the search
    stops once no running beam can beat the worst of `beams` finished ones."""

    def __init__(self, beams: int, max_new: int, eos: int, length_penalty: float = 1.0, device=None):
        self.beams, self.max_new, self.eos, self.length_penalty = beams, max_new, eos, length_penalty
        self.device = device
        self.keep = 2 * beams
        self.top_mask = torch.arange(self.keep, device=device) < beams  # candidates that may finish
        self.running: list[list[int]] = [[] for _ in range(beams)]
        self.running_lps: list[list[float]] = [[] for _ in range(beams)]
        # Every beam starts from the same prompt: only the first counts at the first step.
        self.running_scores = torch.full((beams,), -1e9, device=device)
        self.running_scores[0] = 0.0
        self.fin_scores = torch.full((beams,), -1e9, device=device)
        self.fin_seqs: list[tuple[list[int], list[float]]] = [([], []) for _ in range(beams)]
        self.fin_done = torch.zeros(beams, dtype=torch.bool, device=device)
        self.unsatisfied = True
        self.step = 0

    @property
    def sequences(self) -> list[list[int]]:
        return self.running

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.float(), dim=-1)

    def update(self, lp: torch.Tensor) -> Step:
        beams, penalty = self.beams, self.length_penalty
        vocab = lp.shape[-1]
        top_scores, top_idx = (lp + self.running_scores[:, None]).view(-1).topk(self.keep)
        origin, tokens = top_idx // vocab, top_idx % vocab
        hits = (tokens == self.eos) | (self.step + 1 >= self.max_new)
        cand = [(self.running[b] + [t], self.running_lps[b] + [lp[b, t].item()])
                for b, t in zip(origin.tolist(), tokens.tolist())]
        # The best `beams` candidates that did not finish keep running.
        run_scores = top_scores + hits.float() * -1e9
        nxt = run_scores.topk(beams).indices
        # Finished candidates among the top `beams` join the finished hypotheses, best `beams` kept.
        norm = top_scores / ((self.step + 1) ** penalty)
        norm = norm + (0.0 if self.unsatisfied else -1e9) + (~(hits & self.top_mask)).float() * -1e9
        merged = torch.cat([self.fin_scores, norm])
        best = merged.topk(beams).indices
        self.fin_seqs = [self.fin_seqs[i] if i < beams else cand[i - beams] for i in best.tolist()]
        self.fin_done = torch.cat([self.fin_done, hits & self.top_mask])[best]
        self.fin_scores = merged[best]
        self.running = [cand[i][0] for i in nxt.tolist()]
        self.running_lps = [cand[i][1] for i in nxt.tolist()]
        self.running_scores = run_scores[nxt]
        self.step += 1
        best_running = self.running_scores[0] / (self.step ** penalty)
        worst = torch.where(self.fin_done, self.fin_scores.min(), torch.tensor(-1e9, device=self.device))
        self.unsatisfied = self.unsatisfied and bool((best_running > worst).any())
        done = not self.unsatisfied or bool(hits.all())
        return Step([seq[-1] for seq in self.running], origin[nxt], done)

    def finalize(self, no_speech: list[float]) -> list[WindowResult]:
        seq, seq_lp = self.fin_seqs[0]
        if not seq:  # nothing finished (stopped early): the best running beam
            seq, seq_lp = self.running[0], self.running_lps[0]
        return [WindowResult(seq, seq_lp, no_speech[0], sum_logprob=float(self.fin_scores[0]))]
