"""image-classification: encoded image bytes -> (label, score) pairs, best first.

Ports transformers.pipelines.image_classification.ImageClassificationPipeline: load_image
(EXIF orientation, RGB), the checkpoint's image processor, the model's logits, then
postprocess (function_to_apply default rule, top_k clamped to num_labels, labels from
id2label). Scores are computed in numpy float32 exactly as transformers does, so equal logits
give equal scores.

The work is split in three steps (`preprocess`, `forward`, `postprocess`) that `classify`
composes; a server batching concurrent callers may call them separately so that one caller's
bad image does not fail the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..checkpoints.hub import ModelFiles
from ..errors import InvalidInput, InvalidParameter, ModelLoadFailed, PipeserveError
from ..inputs.image import DEFAULT_MAX_PIXELS, decode_image
from ..inputs.image_processing import ImageProcessor
from ..tasks import Task
from .base import LoadOptions, Pipeline, load_family_model
from .classification import check_function, default_function, ranked_labels
from .options import TaskOptions

Result = list[tuple[str, float]]


@dataclass(frozen=True)
class ImageClassificationOptions(TaskOptions):
    top_k: int | None = 5  # transformers: postprocess(top_k=5)
    function_to_apply: str | None = None  # None: the config's default rule


class ImageClassificationPipeline(Pipeline):
    task: ClassVar[Task] = Task.IMAGE_CLASSIFICATION
    options_type: ClassVar[type[TaskOptions]] = ImageClassificationOptions

    # Decompression-bomb guard for decode_image; set from LoadOptions.max_image_pixels.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Largest batch a single forward pass takes (bounds activation memory of a big call).
    max_batch_size: int = 64

    def __init__(self, files: ModelFiles, options: LoadOptions, model: torch.nn.Module,
                 processor: ImageProcessor):
        config = files.config
        super().__init__(files, options, family=config.get("model_type", ""),
                         architecture=(config.get("architectures") or [""])[0])
        self.model = model
        self.modules_.append(model)
        self.processor = processor
        self.max_pixels = int(getattr(options, "max_image_pixels", DEFAULT_MAX_PIXELS))
        self.id2label: dict[int, str] = dict(model.config.id2label)
        self.num_labels = len(self.id2label)
        self.problem_type = config.get("problem_type")
        self.image_hw = tuple(model.config.image_hw)
        self.settle_defaults()

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "ImageClassificationPipeline":
        preprocessor = files.read_json("preprocessor_config.json")
        if preprocessor is None:
            raise ModelLoadFailed(f"{files.name} has no preprocessor_config.json; an image classifier "
                                  "needs its image processor settings", reason="PREPROCESSOR_MISSING")
        processor = ImageProcessor.from_dict(preprocessor)
        model = load_family_model(files, options, "image_classification")
        return cls(files, options, model, processor)

    # -- options ---------------------------------------------------------------------------

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Checks top_k and function_to_apply; returns them normalised."""
        top_k = options.get("top_k")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
                raise InvalidParameter(f"top_k must be an integer, got {top_k!r}")
            if top_k <= 0:
                raise InvalidParameter(f"top_k must be at least 1, got {top_k}",
                                       metadata={"field": "top_k"})
            options["top_k"] = int(top_k)
        check_function(options)
        return options

    def default_function(self) -> str:
        return default_function(self.problem_type, self.num_labels)

    # -- steps -----------------------------------------------------------------------------

    def preprocess(self, image: bytes) -> torch.Tensor:
        """Encoded bytes -> pixel values (3, H, W) float32 on CPU."""
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"image must be bytes, got {type(image).__name__}")
        rgb = decode_image(bytes(image), max_pixels=self.max_pixels)
        return torch.from_numpy(self.processor(rgb))

    @torch.inference_mode()
    def forward(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        """Pixel values of equal shape -> logits (B, num_labels) float32 on CPU."""
        batch = torch.stack(pixel_values).to(device=self.device, dtype=self.dtype)
        # Position embeddings are interpolated only when the processor's size differs from the
        # checkpoint's (transformers would raise there); equal sizes take the plain path.
        interpolate = tuple(batch.shape[-2:]) != self.image_hw
        logits = self.model(batch, interpolate_pos_encoding=interpolate)
        return logits.float().cpu()

    def postprocess(self, logits: torch.Tensor, options: ImageClassificationOptions) -> Result:
        """One image's logits (num_labels,) -> [(label, score)] best first, top_k long."""
        function = options.function_to_apply or self.default_function()
        top_k = min(options.top_k or self.num_labels, self.num_labels)
        return ranked_labels(logits, function, self.id2label)[:top_k]

    # -- call ------------------------------------------------------------------------------

    def classify(self, images: list[bytes],
                 options: ImageClassificationOptions | Mapping[str, Any] | None = None) -> list[Result]:
        """Classifies each image; one result per image, in order. Batched forward passes give
        the same results as one image at a time (all images share one processed size, or are
        grouped by size). A bad image raises its typed error, naming its index in a batch."""
        resolved = self.call_options(options)
        if not images:
            raise InvalidInput("no images to classify", reason="EMPTY_INPUT")
        pixels: list[torch.Tensor] = []
        for index, image in enumerate(images):
            try:
                pixels.append(self.preprocess(image))
            except PipeserveError as error:
                if len(images) > 1:
                    error.message = f"image {index}: {error.message}"
                    error.args = (error.message,)
                    error.metadata.setdefault("index", str(index))
                raise
        logits: list[torch.Tensor | None] = [None] * len(images)
        for indices in self._batches(pixels):
            rows = self.forward([pixels[i] for i in indices])
            for i, row in zip(indices, rows):
                logits[i] = row
        return [self.postprocess(row, resolved) for row in logits]

    def _batches(self, pixels: list[torch.Tensor]) -> list[list[int]]:
        """Indices grouped by pixel shape (only shortest_edge resizing makes shapes differ),
        each group cut to max_batch_size."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(pixels):
            groups.setdefault(tuple(tensor.shape), []).append(i)
        return [idx[s:s + self.max_batch_size] for idx in groups.values()
                for s in range(0, len(idx), self.max_batch_size)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_labels": self.num_labels}

    run_batch = classify  # what the dynamic batcher runs (contracts.BatchedPipeline)
