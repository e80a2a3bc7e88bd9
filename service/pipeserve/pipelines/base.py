"""What every task pipeline shares: how it is built from checkpoint files, where it lives,
how its per-call options are built (the model's defaults, the request's fields, the task's
checks: options.py), and how much memory it holds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..checkpoints.hub import ModelFiles
from ..checkpoints.registry import family_module
from ..checkpoints.weights import parse_dtype
from ..devices import require_device
from ..layers.memory import module_memory
from ..layers.passes import PostLoad, VerifiedHeadSite, apply_post_load_passes
from ..tasks import Task
from .options import TaskOptions


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model (LoadModel's options)."""

    device: str = "cpu"
    dtype: str = "float32"
    # How the weights are stored when that differs from `dtype`: "float16" keeps a float32
    # model's linear and embedding weights in float16, widened per product (layers/
    # half_storage.py; families whose recipe allows it); "" = as `dtype`.
    weights_dtype: str = ""
    # int8 weights (layers/quantization.py); None: the source's default (loading.with_source_defaults).
    load_in_8bit: bool | None = None
    # The quantized form of the weights: "none" (float), "int8" (what load_in_8bit=True
    # selects), "grouped" (groups of 32 weights on grids of up to 256 levels, a GGUF's
    # Q4_K/Q5_0/Q8_0 values exactly, held as one or two int4 planes; layers/grid_int4.py);
    # None: load_in_8bit decides, else the source's default (loading.with_source_defaults).
    quantization: str | None = None
    allow_pickle: bool = False
    # CPU float32/bfloat16 linear layers run on oneDNN-prepacked weights (layers/packed_linear.py):
    # 2-4x faster at inference batch sizes, same arithmetic up to summation order.
    packed_linear: bool = True
    # Per-call option defaults for this model, named as the request fields are.
    defaults: dict[str, Any] = field(default_factory=dict)
    # Server-wide input limits (Settings), enforced by the pipelines' decoders.
    max_image_pixels: int = 89_478_485
    max_audio_seconds: float = 4 * 3600.0
    max_prompt_tokens: int = 0  # 0 = the model's context is the only bound
    # Server-wide queue and continuous-batching bounds (Settings).
    max_queue: int = 256
    generation_max_batch_size: int = 32
    generation_max_batch_tokens: int = 65536
    # Whisper windows of concurrent calls decoding together (pipelines/whisper/batch_scheduler.py).
    asr_max_batch_rows: int = 16

    def __post_init__(self) -> None:
        # Before anything is built: torch's own error for a device that is not there is a bare
        # AssertionError from its CUDA initialisation.
        require_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        """The device the pipeline's inputs go to; with device "auto" (layers spread over the
        visible GPUs, then CPU) that is the first GPU, or the CPU when there is none."""
        if self.device == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


def load_family_model(files: ModelFiles, options: LoadOptions, head: str, *, family=None,
                      verified_head: Callable[[nn.Module], VerifiedHeadSite | None] | None = None) -> nn.Module:
    """The `head` module of the checkpoint's family (`family`, or the one its model_type names),
    loaded by the one load sequence (checkpoints/loader.py), then the post-load passes
    (layers/passes.py: int8, placement, packing, the verified head at the site `verified_head`
    names). Every pipeline builds its model here, so every model gets the same passes."""
    family = family if family is not None else family_module(files.config.get("model_type", ""))
    model = family.load_model(files, options, head)
    site = verified_head(model) if verified_head is not None else None
    apply_post_load_passes(model, PostLoad(options, site))
    return model


class Pipeline:
    """Base of task pipelines. Subclasses set `task`, implement `from_files` and their
    call methods, and keep every nn.Module they own in `self.modules_` so that memory
    accounting and release are generic."""

    task: ClassVar[Task]
    # The task's per-call options: field names, built-in defaults (transformers' ones).
    options_type: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, files: ModelFiles, options: LoadOptions, family: str, architecture: str = ""):
        self.files = files
        self.load_options = options
        self.family = family
        self.architecture = architecture
        self.device = options.torch_device
        self.dtype = options.torch_dtype
        self.modules_: list[nn.Module] = []
        self.options_type.check_names(options.defaults, self.task.value)
        # The model's option defaults; subclasses check them once loaded (settle_defaults).
        self.defaults = {**self.options_type.builtin_defaults(), **options.defaults}
        self.default_options: TaskOptions | None = None

    @classmethod
    def from_files(cls, files: ModelFiles, options: LoadOptions) -> "Pipeline":
        raise NotImplementedError

    # -- options ----------------------------------------------------------------------------

    def check_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """The task's checks over merged option values: returns them normalised, or raises
        InvalidParameter naming the field. Tasks with checks override this."""
        return values

    def options(self, overrides: Mapping[str, Any] | None = None) -> TaskOptions:
        """This call's options: the model's defaults, the fields the request set (None = not
        set) over them, checked once; the frozen result is what the pipeline methods take."""
        merged = self.options_type.merge(self.defaults, overrides or {})
        return self.options_type.of(self.check_options(merged))

    def settle_defaults(self) -> None:
        """Checks the model's default options once it is loaded (a bad LoadModel default fails
        the load); requests' fields are then merged over the checked values."""
        self.default_options = self.options()
        self.defaults = self.default_options.as_dict()

    def call_options(self, options: TaskOptions | Mapping[str, Any] | None) -> TaskOptions:
        """A pipeline method's options argument: built options pass through, not checked
        again; None (the model's defaults) or a mapping of fields (in-process callers) is
        built here."""
        if isinstance(options, self.options_type):
            return options
        if isinstance(options, TaskOptions):
            raise TypeError(f"{type(self).__name__} takes {self.options_type.__name__}, "
                            f"not {type(options).__name__}")
        return self.options(options)

    def memory_usage(self) -> dict[str, int]:
        """Resident bytes by kind (layers/memory.py): weights, packed, screening, cache."""
        return module_memory(self.modules_)

    def memory_bytes(self) -> int:
        return sum(self.memory_usage().values())

    def close(self) -> None:
        """Drops the modules so their memory can be reclaimed."""
        self.modules_.clear()
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.Module):
                setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "architecture": self.architecture,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def replace_options(options: LoadOptions, **changes: Any) -> LoadOptions:
    return dataclasses.replace(options, **changes)
