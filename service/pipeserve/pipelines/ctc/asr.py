"""automatic-speech-recognition with CTC models (wav2vec2, HuBERT): 16 kHz waveform ->
text with segment, word and character timestamps.

Ports transformers/pipelines/automatic_speech_recognition.py for type "ctc":
`preprocess` (Wav2Vec2FeatureExtractor normalisation; `chunk_iter` with chunk_length_s and
stride_length_s aligned to inputs_to_logits_ratio), `_forward` (argmax of the logits,
`rescale_stride` to frames) and `postprocess` (strided frames cut and concatenated, then
Wav2Vec2CTCTokenizer.decode with char offsets -> `chunks` timestamps). Chunks of one input
are batched without padding (equal-length chunks together), so the result equals the
reference's batch_size=1 run for every model, group-norm ones included.

Results are pipelines.asr_types values, cut into segments by pipelines/ctc/stream.py (which
also holds the live-streaming session). Segments break before a word delimiter, so words
never straddle segments; the concatenated segment chars / words are exactly the reference's
"char" / "word" chunks, and Transcription.text is exactly its text.
"""
from __future__ import annotations

import math
import dataclasses
from typing import Any, ClassVar, Iterator, Mapping

import torch

from ...checkpoints.hub import ModelFiles
from ...errors import InvalidInput, InvalidParameter, ModelLoadFailed
from ...inputs.audio import MODEL_SAMPLE_RATE, validate_waveform
from ...models import wav2vec2
from ...tasks import Task
from ..asr_types import Segment, Transcription
from ..base import LoadOptions, Pipeline, load_family_model
from ..contracts import StopCheck
from ..options import TaskOptions
from .decoding import CTCVocabulary
from .options import CTCOptions
from .stream import CTCLiveStream, Segmenter

# return_timestamps spellings (request strings, proto enum names, transformers values) -> level.
_TIMESTAMPS = {
    None: "segment", False: "segment", True: "segment", "": "segment", "none": "segment", "false": "segment",
    "true": "segment", "unspecified": "segment", "segment": "segment", "char": "char", "word": "word",
}
# Whisper options a CTC model cannot honour when set to anything but their no-op value.
_UNSUPPORTED = {"task": ("transcribe", "unspecified", "speech_task_transcribe", "speech_task_unspecified"),
                "num_beams": (1,), "temperature": (0, 0.0), "initial_prompt": ("",),
                "long_form_sequential": (False,)}


class CTCASRPipeline(Pipeline):
    task: ClassVar[Task] = Task.AUTOMATIC_SPEECH_RECOGNITION
    options_type: ClassVar[type[TaskOptions]] = CTCOptions
    # Unchunked attention is quadratic in length: longer inputs without chunk_length_s are
    # chunked with AUTO_CHUNK_S windows (the pipeline's default stride of chunk/6).
    max_unchunked_s: float = 60.0
    auto_chunk_s: float = 30.0
    max_audio_s: float = 4 * 3600.0
    max_batch_size: int = 64
    # Live streaming: window length when the stream's options set no chunk_length_s.
    live_chunk_s: float = 5.0
    # What this model's last live interim decode cost (s): a new stream's interim interval
    # starts from it (CTCLiveStream.interim_interval_s).
    live_decode_cost_s: float = 0.0

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module,
                 vocab: CTCVocabulary, preprocessor: dict[str, Any]):
        config = files.config
        super().__init__(files, options, family=config.get("model_type", ""),
                         architecture=(config.get("architectures") or [""])[0])
        self.model = model
        self.modules_.append(model)
        self.vocab = vocab
        self.sampling_rate = int(preprocessor.get("sampling_rate", MODEL_SAMPLE_RATE))
        if self.sampling_rate != MODEL_SAMPLE_RATE:
            raise ModelLoadFailed(f"feature extractor sampling_rate {self.sampling_rate} is not 16000",
                                  reason="UNSUPPORTED_CONFIG")
        self.do_normalize = bool(preprocessor.get("do_normalize", True))
        self.padding_value = float(preprocessor.get("padding_value", 0.0))
        self.align_to = model.config.inputs_to_logits_ratio  # samples per logit frame
        self.min_samples = _receptive_field(model.config)
        self.max_audio_s = float(getattr(options, "max_audio_seconds", self.max_audio_s))
        self.settle_defaults()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "CTCASRPipeline":
        preprocessor = files.read_json("preprocessor_config.json")
        if preprocessor is None:  # transformers >= 5 saves it inside processor_config.json
            preprocessor = (files.read_json("processor_config.json") or {}).get("feature_extractor") or {}
        vocab = CTCVocabulary.from_files(files)
        model = load_family_model(files, options, "ctc", family=wav2vec2)
        if len(vocab.id_to_token) > model.config.vocab_size:
            raise ModelLoadFailed(f"vocab.json has {len(vocab.id_to_token)} tokens, the CTC head "
                                  f"{model.config.vocab_size}", reason="BAD_TOKENIZER")
        return cls(files, options, model, vocab, preprocessor)

    # -- options ---------------------------------------------------------------------------

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        level = options.get("return_timestamps")
        key = level.lower().removeprefix("timestamp_granularity_") if isinstance(level, str) else level
        if key not in _TIMESTAMPS:
            raise InvalidParameter(f"return_timestamps must be 'char', 'word' or 'segment' for CTC models, "
                                   f"got {level!r}", metadata={"field": "return_timestamps"})
        options["return_timestamps"] = _TIMESTAMPS[key]
        for name, allowed in _UNSUPPORTED.items():
            value = options.get(name)
            if value is not None and (value.lower() if isinstance(value, str) else value) not in allowed:
                raise InvalidParameter(f"{name}={value!r} is not supported by CTC models (wav2vec2 / HuBERT)",
                                       metadata={"field": name})
        chunk = options.get("chunk_length_s")
        if chunk is not None and (not _finite(chunk) or chunk < 0):
            raise InvalidParameter(f"chunk_length_s must be a positive number, got {chunk!r}",
                                   metadata={"field": "chunk_length_s"})
        stride = options.get("stride_length_s")
        if stride is not None:
            pair = isinstance(stride, (list, tuple))
            if pair and len(stride) != 2:
                raise InvalidParameter("stride_length_s is one number or a (left, right) pair",
                                       metadata={"field": "stride_length_s"})
            if any(not _finite(s) or s < 0 for s in (stride if pair else [stride])):
                raise InvalidParameter(f"stride_length_s must be non-negative, got {stride!r}",
                                       metadata={"field": "stride_length_s"})
        batch = options.get("batch_size")
        if batch is None:
            options["batch_size"] = 1
        elif isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= self.max_batch_size:
            raise InvalidParameter(f"batch_size must be an integer in 1..{self.max_batch_size}, got {batch!r}",
                                   metadata={"field": "batch_size"})
        interval = options.get("interim_interval_s")
        if interval is not None and (not _finite(interval) or interval <= 0):
            raise InvalidParameter(f"interim_interval_s must be positive, got {interval!r}",
                                   metadata={"field": "interim_interval_s"})
        return options

    def _chunking(self, options: CTCOptions, n_samples: int) -> tuple[int, int, int] | None:
        """(chunk_len, stride_left, stride_right) in samples, aligned to whole frames as the
        reference's preprocess does, or None for one unchunked pass."""
        chunk_s = options.chunk_length_s
        if not chunk_s:
            if n_samples <= self.max_unchunked_s * self.sampling_rate:
                return None
            chunk_s = self.auto_chunk_s
        stride_s = options.stride_length_s
        if stride_s is None:
            stride_s = chunk_s / 6
        left_s, right_s = stride_s if isinstance(stride_s, (list, tuple)) else (stride_s, stride_s)
        align, rate = self.align_to, self.sampling_rate
        chunk_len = int(round(chunk_s * rate / align) * align)
        left = int(round(left_s * rate / align) * align)
        right = int(round(right_s * rate / align) * align)
        if chunk_len < left + right:
            raise InvalidParameter("chunk_length_s must be greater than the two strides together",
                                   metadata={"field": "stride_length_s"})
        if chunk_len - left - right <= 0 or chunk_len < self.min_samples:
            raise InvalidParameter(f"chunk_length_s={chunk_s} with stride {stride_s} leaves no audio to advance by",
                                   metadata={"field": "chunk_length_s"})
        return chunk_len, left, right

    # -- preprocess / forward --------------------------------------------------------------

    def normalize(self, waveform: torch.Tensor) -> torch.Tensor:
        """Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm of one unpadded input (float32)."""
        x = waveform.to(torch.float32)
        if not self.do_normalize:
            return x
        x64 = x.double()
        mean = x64.mean().to(torch.float32)
        var = x64.var(unbiased=False).to(torch.float32)
        return (x - mean) / torch.sqrt(var + 1e-7)

    def frames(self, n_samples: int) -> int:
        return max(0, int(self.model.config.output_length(n_samples)))

    def forward(self, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised inputs -> per input (frame ids, their log probabilities). Unequal lengths
        are right-padded with an attention mask (layer-norm models only: a group-norm feature
        encoder normalises over time, so padding would change its output)."""
        lengths = [x.shape[0] for x in inputs]
        frames = [self.frames(n) for n in lengths]
        if max(frames) < 1:
            empty = torch.zeros(0, dtype=torch.long)
            return [(empty, empty.float()) for _ in inputs]
        mask = None
        if len(set(lengths)) == 1:
            batch = torch.stack(inputs)
        else:
            batch = torch.full((len(inputs), max(lengths)), self.padding_value)
            mask = torch.zeros(len(inputs), max(lengths), dtype=torch.long)
            for i, x in enumerate(inputs):
                batch[i, : x.shape[0]], mask[i, : x.shape[0]] = x, 1
            mask = mask.to(self.device)
        with torch.inference_mode():
            logits = self.model(batch.to(self.device, self.dtype), mask).float()
            ids = logits.argmax(-1)
            logprobs = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        return [(ids[i, : frames[i]].cpu(), logprobs[i, : frames[i]].cpu()) for i in range(len(inputs))]

    def _windows(self, waveform: torch.Tensor, options: CTCOptions,
                 should_stop: StopCheck | None = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Batches of (frame ids, logprobs) cut to their strided centre, in order: the reference's
        chunk_iter + _forward + postprocess slicing, `batch_size` equal-length chunks at a time."""
        n = waveform.shape[0]
        chunking = self._chunking(options, n)
        if chunking is None:
            ids, lps = self.forward([self.normalize(waveform)])[0]
            yield [(ids, lps)]
            return
        chunk_len, stride_left, stride_right = chunking
        step = chunk_len - stride_left - stride_right
        pending: list[tuple[torch.Tensor, tuple[int, int, int]]] = []
        for start in range(0, n, step):
            end = start + chunk_len
            chunk = waveform[start:end]
            is_last = end >= n
            stride = (chunk.shape[0], 0 if start == 0 else stride_left, 0 if is_last else stride_right)
            if should_stop is not None and should_stop():
                return
            if chunk.shape[0] > stride[1]:
                if pending and (len(pending) >= options.batch_size or pending[0][0].shape[0] != chunk.shape[0]):
                    yield self._run_chunks(pending)
                    pending = []
                pending.append((self.normalize(chunk), stride))
            if is_last:
                break
        if pending:
            yield self._run_chunks(pending)

    def _run_chunks(self, chunks: list[tuple[torch.Tensor, tuple[int, int, int]]]):
        outputs = self.forward([c for c, _ in chunks])
        cut = []
        for (ids, lps), (_, stride) in zip(outputs, chunks):
            token_n, left, right = _rescale_stride(stride, 1 / self.align_to)
            cut.append((ids[left:token_n - right], lps[left:token_n - right]))
        return cut

    # -- call methods ----------------------------------------------------------------------

    def _check(self, waveform: torch.Tensor) -> torch.Tensor:
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
            raise InvalidInput("audio must be a mono waveform (1-D)", metadata={"field": "audio"})
        validate_waveform(waveform, self.sampling_rate, max_seconds=self.max_audio_s)
        return waveform.to(torch.float32)

    def transcribe_stream(self, waveform_16k: torch.Tensor, options: CTCOptions | Mapping[str, Any] | None,
                          should_stop: StopCheck | None = None) -> Iterator[Segment | Transcription]:
        """Yields final Segments as each batch of chunks is decoded, then the Transcription.
        `should_stop` (cancellation, deadline) is checked before each batch of chunks."""
        options = self.call_options(options)
        waveform = self._check(waveform_16k)
        batches = self._windows(waveform, options, should_stop) if waveform.shape[0] >= self.min_samples else []
        yield from self._decode(batches, waveform, options)

    def _decode(self, batches, waveform: torch.Tensor, options: CTCOptions) -> Iterator[Segment | Transcription]:
        segmenter = Segmenter(self, options.return_timestamps)
        most = 1
        for batch in batches:
            most = max(most, len(batch))
            for ids, lps in batch:
                segmenter.decoder.push(ids.tolist(), lps.tolist())
            segment = segmenter.take(final=False)
            if segment is not None:
                yield segment
        segment = segmenter.take(final=True)
        if segment is not None:
            yield segment
        yield Transcription(text=segmenter.decoder.text(), segments=segmenter.segments,
                            duration_s=waveform.shape[0] / self.sampling_rate, batch_size=most)

    def transcribe(self, waveforms: list[torch.Tensor],
                   options: CTCOptions | Mapping[str, Any] | None = None) -> list[Transcription]:
        """One Transcription per input. Unchunked inputs are batched together (layer-norm
        models: padded with a mask; group-norm models: equal lengths only); each long input's
        chunks are batched with each other."""
        resolved = self.call_options(options)
        waves = [self._check(w) for w in waveforms]
        results: list[Transcription | None] = [None] * len(waves)
        groups: dict[int, list[int]] = {}
        masked = self.model.config.feat_extract_norm == "layer"
        for i in sorted(range(len(waves)), key=lambda i: waves[i].shape[0]):
            n = waves[i].shape[0]
            if n >= self.min_samples and self._chunking(resolved, n) is None:
                groups.setdefault(0 if masked else n, []).append(i)
        for members in groups.values():
            for k in range(0, len(members), self.max_batch_size):
                part = members[k:k + self.max_batch_size]
                outputs = self.forward([self.normalize(waves[i]) for i in part])
                for i, output in zip(part, outputs):
                    *_, results[i] = self._decode([[output]], waves[i], resolved)
        for i, waveform in enumerate(waves):
            if results[i] is None:
                *_, results[i] = self.transcribe_stream(waveform, resolved)
        return results

    def open_stream(self, options: CTCOptions | Mapping[str, Any] | None) -> "CTCLiveStream":
        """A live-streaming session for StreamingTranscribe (see CTCLiveStream)."""
        options = self.call_options(options)
        if not options.chunk_length_s:
            options = dataclasses.replace(options, chunk_length_s=self.live_chunk_s)
        return CTCLiveStream(self, options)


def _rescale_stride(stride: tuple[int, int, int], ratio: float) -> tuple[int, int, int]:
    """transformers.pipelines.automatic_speech_recognition.rescale_stride for one chunk."""
    input_n, left, right = stride
    token_n = int(round(input_n * ratio))
    return token_n, int(round(left / input_n * token_n)), int(round(right / input_n * token_n))


def _receptive_field(config) -> int:
    """Fewest samples that make one frame (400 = 25 ms for the standard feature encoder)."""
    n = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        n = (n - 1) * stride + kernel
    return n


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
