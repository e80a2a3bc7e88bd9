"""Parity on any device and dtype: every family's logits against transformers', and greedy tokens.

The float32 CPU parity tests (test_encoder_models, test_generation_models, test_whisper_parity,
test_vit, test_wav2vec2_model) hold us to 1e-4. In float16/bfloat16 neither side is exact, so a
case here compares our model, loaded the way LoadModel loads it on `device` in `dtype`, with
  - the truth: the transformers model in float32 on the CPU, within `tolerance(dtype, ...)`;
  - its peer: the transformers model on the same device in the same dtype, within twice that
    (both sides are within the tolerance of the truth, so of each other within twice it).
The cases reuse the tiny-checkpoint builders of the CPU tests; tests/test_cuda.py runs them on
the GPU in float16 and bfloat16, tests/test_device_parity.py runs the same code on the CPU in
bfloat16 so that it is exercised without a GPU.

Tolerance derivation (`tolerance`): rounding a value to a dtype with machine epsilon eps moves
it by at most eps/2 relative. A layer's matmuls accumulate in float32 (cuBLAS and oneDNN do for
half inputs) and round once on output, and its norms and softmaxes round their inputs and
outputs: each layer adds an error of a few eps relative to the activations' scale, and the
residual stream carries the errors of all earlier layers forward, so after `depth` layers plus
the embedding and the output projection the error is bounded by about
    c * eps * (depth + 2) * scale,
with `scale` the largest reference logit magnitude (the projection to logits maps activation
error onto that scale) and c the number of roundings per layer whose errors can line up
(input rounding, attention, feed-forward, norm: c = SAFETY = 4). For float16 (eps = 2^-10) and a
2-layer model that is 1.6% of the largest logit; for bfloat16 (eps = 2^-7) 12.5%. float32 keeps
the project's 1e-4 absolute bound. Measured on the CPU in bfloat16 (tests/test_device_parity.py),
every family's error is 1-10% of this bound except Whisper's (about a third: its tiny checkpoint
has init_std 0.5, so large activations), and transformers' own bfloat16 error is the same size
as ours.

Greedy tokens (`assert_same_greedy`): two half-precision runs may pick different tokens where
the truth's two best logits are closer than the error either run may have: both runs' logits
are within `tol` of the truth, so a different choice is only legitimate when the truth's gap
between the two candidates is at most 2 * tol. The sequences must be equal up to the first
difference, and that difference must be such a tie (after it, the prefixes differ and nothing
more can be compared).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harness import PARITY_ATOL

SAFETY = 4.0


def tolerance(dtype: torch.dtype, scale: float, depth: int) -> float:
    """Largest |ours - float32 truth| allowed for a `depth`-layer model whose reference output
    reaches `scale` in magnitude (the derivation is in the module docstring)."""
    if dtype == torch.float32:
        return PARITY_ATOL
    return SAFETY * torch.finfo(dtype).eps * (depth + 2) * max(scale, 1e-6)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a - b).abs().max().item()


def to_device(inputs: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Inputs on `device`; floating ones (features, pixels, audio) in `dtype`, ids stay integers."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


# ---- the cases ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One family: how to build its tiny checkpoint, what to feed it, what to compare."""

    name: str
    depth: int  # layers the signal passes (encoder + decoder for seq2seq)
    build: Callable[[Path], tuple[Path, nn.Module]]  # -> checkpoint dir, transformers model (float32, CPU)
    inputs: Callable[[nn.Module, Path], dict[str, Any]]  # (reference, checkpoint dir) -> seeded CPU tensors
    ours: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    reference: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    head: str | None = None  # load the family module's head directly (no pipeline serves it alone)
    keep: Callable[[dict[str, Any]], torch.Tensor] | None = None  # which positions count (not padding)


def load_ours(case: Case, directory: Path, device: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], None]]:
    """Our model as LoadModel builds it (the pipeline's model, or the family's head), on device,
    and what releases it (the pipeline's close: its engine and caches too)."""
    from harness import load_pipeline
    from pipeserve.checkpoints.hub import resolve
    from pipeserve.layers.packed_linear import pack_linears
    from pipeserve.pipelines.base import LoadOptions
    from pipeserve.checkpoints.registry import FAMILIES

    dtype_name = str(dtype).removeprefix("torch.")
    if case.head is None:
        pipe = load_pipeline(directory, device=device, dtype=dtype_name)
        return pipe.model, pipe.close
    files = resolve(str(directory))
    model = importlib.import_module(FAMILIES[files.config["model_type"]]).load_model(
        files, LoadOptions(device=device, dtype=dtype_name), case.head)
    pack_linears(model)  # as the pack pass does for these families (layers/passes.py; CPU only, a no-op on CUDA)
    return model, lambda: None


def _encoder_case(family: str) -> Case:
    texts = ["Sarah lives in Paris, doesn't she?", "Ünïcode wörds 3.14 end", "a"]

    def build(directory: Path):
        from encoder_checkpoints import build_checkpoint

        directory, model, tokenizer = build_checkpoint(family, "masked_lm", directory)
        return directory, model

    def inputs(model, directory):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))

    return Case(
        name=family, depth=2, build=build, inputs=inputs, head="masked_lm",
        ours=lambda m, x: m(x["input_ids"], x["attention_mask"], x.get("token_type_ids")),
        reference=lambda m, x: m(**x).logits,
        keep=lambda x: x["attention_mask"].bool())


def _causal_case(family: str, **overrides) -> Case:
    def build(directory: Path):
        from generation_checkpoints import build as build_lm

        model, _ = build_lm(family.split("-")[0], directory, **overrides)
        return directory, model

    def inputs(model, directory):
        generator = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(3, model.config.vocab_size, (2, 24), generator=generator)}

    return Case(name=family, depth=2, build=build, inputs=inputs,
                ours=lambda m, x: m(x["input_ids"]), reference=lambda m, x: m(x["input_ids"]).logits)


def _bart_case() -> Case:
    def build(directory: Path):
        from transformers import BartForSequenceClassification
        from zero_shot_docqa_checkpoints import build_bart_nli

        build_bart_nli(directory)
        return directory, BartForSequenceClassification.from_pretrained(directory).eval()

    def inputs(model, directory):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        pairs = [["Paris is in France.", "This is about travel."], ["The fox jumps.", "This is about animals."]]
        return dict(tokenizer(pairs, padding=True, return_tensors="pt"))

    return Case(name="bart", depth=4, build=build, inputs=inputs, head="sequence_classification",
                ours=lambda m, x: m(x["input_ids"], x["attention_mask"]),
                reference=lambda m, x: m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits)


def _layoutlm_case() -> Case:
    def build(directory: Path):
        from transformers import LayoutLMForQuestionAnswering
        from zero_shot_docqa_checkpoints import build_layoutlm_qa

        build_layoutlm_qa(directory)
        return directory, LayoutLMForQuestionAnswering.from_pretrained(directory).eval()

    def inputs(model, directory):
        generator = torch.Generator().manual_seed(2)
        ids = torch.randint(5, model.config.vocab_size, (2, 20), generator=generator)
        corners = torch.randint(0, 500, (2, 20, 2), generator=generator)
        bbox = torch.cat([corners, corners + torch.randint(1, 400, (2, 20, 2), generator=generator)], -1)
        return {"input_ids": ids, "bbox": bbox, "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids)}

    def ours(m, x):
        return torch.stack(m(x["input_ids"], x["bbox"], x["attention_mask"], x["token_type_ids"]))

    def reference(m, x):
        out = m(**x)
        return torch.stack([out.start_logits, out.end_logits])

    return Case(name="layoutlm", depth=2, build=build, inputs=inputs, head="question_answering",
                ours=ours, reference=reference)


def _whisper_case(multilingual: bool) -> Case:
    def build(directory: Path):
        import whisper_checkpoints as wc
        from transformers import WhisperForConditionalGeneration

        directory = wc.build(directory, multilingual=multilingual, n_mels=128 if multilingual else 80,
                             seed=int(multilingual))
        return directory, WhisperForConditionalGeneration.from_pretrained(directory).eval()

    def inputs(model, directory):
        generator = torch.Generator().manual_seed(3)
        sot = model.generation_config.decoder_start_token_id
        return {"input_features": torch.randn(2, model.config.num_mel_bins, 3000, generator=generator),
                "decoder_input_ids": torch.tensor([[sot, 50360, 400, 500, 600, 11, 13],
                                                   [sot, 1, 2, 3, 50364, 50400, 50257]])}

    return Case(name="whisper-" + ("multilingual" if multilingual else "en"), depth=4, build=build, inputs=inputs,
                ours=lambda m, x: m(x["input_features"], x["decoder_input_ids"]),
                reference=lambda m, x: m(**x).logits)


def _vit_case() -> Case:
    def build(directory: Path):
        import transformers

        from harness import save_checkpoint

        torch.manual_seed(0)
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, image_size=32, patch_size=8, num_labels=5)
        model = transformers.ViTForImageClassification(config).eval()
        try:  # transformers 5 splits the PIL processor out; 4.x has the one class
            from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as Processor
        except ImportError:
            from transformers import ViTImageProcessor as Processor
        return save_checkpoint(model, directory, Processor(size={"height": 32, "width": 32})), model

    def inputs(model, directory):
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))}

    return Case(name="vit", depth=2, build=build, inputs=inputs,
                ours=lambda m, x: m(x["pixel_values"]), reference=lambda m, x: m(**x).logits)


def _ctc_case(variant: str) -> Case:
    def build(directory: Path):
        import wav2vec2_checkpoints as ck

        return ck.build(variant, directory)

    def inputs(model, directory):
        import wav2vec2_checkpoints as ck

        return {"input_values": torch.from_numpy(ck.audio(1.3, seed=3))[None]}

    # 7 convolutions of the feature encoder, then the transformer layers.
    return Case(name="wav2vec2-" + variant if not variant.startswith("hubert") else variant, depth=2 + 7, build=build, inputs=inputs, head="ctc",
                ours=lambda m, x: m(x["input_values"]), reference=lambda m, x: m(**x).logits)


CASES: dict[str, Case] = {c.name: c for c in [
    *(_encoder_case(f) for f in ("bert", "roberta", "xlm-roberta", "distilbert")),
    _bart_case(), _layoutlm_case(),
    _causal_case("gpt2"), _causal_case("opt"), _causal_case("llama"),
    _causal_case("mistral-sliding", sliding_window=5), _causal_case("qwen2", tie_word_embeddings=True),
    _whisper_case(False), _whisper_case(True),
    _vit_case(), _ctc_case("base"), _ctc_case("hubert"),
]}
CAUSAL = ("gpt2", "opt", "llama", "mistral-sliding", "qwen2")


@dataclass
class ParityResult:
    case: str
    device: str
    dtype: str
    scale: float
    tol: float
    vs_truth: float  # max |ours - transformers float32 CPU|
    vs_peer: float  # max |ours - transformers on device in dtype|
    peer_vs_truth: float  # transformers' own error in this dtype, for the report

    def __str__(self) -> str:
        return (f"{self.case:<20} {self.dtype:<8} {self.device}: |ours-truth| {self.vs_truth:.3g}, "
                f"|ours-transformers| {self.vs_peer:.3g}, |transformers-truth| {self.peer_vs_truth:.3g}, "
                f"tolerance {self.tol:.3g} (logit scale {self.scale:.3g})")

    def check(self) -> None:
        assert self.vs_truth <= self.tol, (
            f"{self.case} {self.dtype} on {self.device}: |ours - float32 truth| = {self.vs_truth:.3g} > "
            f"{self.tol:.3g} (transformers' own error in this dtype: {self.peer_vs_truth:.3g})")
        assert self.vs_peer <= 2 * self.tol, (
            f"{self.case} {self.dtype} on {self.device}: |ours - transformers {self.dtype}| = "
            f"{self.vs_peer:.3g} > {2 * self.tol:.3g}")


def logits_parity(case: Case, directory: Path, reference: nn.Module, device: str,
                  dtype: torch.dtype) -> ParityResult:
    """Loads ours on device in dtype, checks every weight landed there, and measures both errors."""
    ours, release = load_ours(case, directory, device, dtype)
    target = torch.device(device)
    for name, tensor in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert tensor.device.type == target.type, f"{case.name}: {name} is on {tensor.device}, not {device}"
        if tensor.is_floating_point() and tensor.dtype not in (dtype, torch.float32):
            raise AssertionError(f"{case.name}: {name} is {tensor.dtype}, loaded as {dtype}")
    inputs = case.inputs(reference, directory)
    peer = _peer(reference, device, dtype)
    try:
        with torch.no_grad():
            truth = case.reference(reference, inputs)
            peer_out = case.reference(peer, to_device(inputs, device, dtype))
            out = case.ours(ours, to_device(inputs, device, dtype))
    finally:
        release()
    if case.keep is not None:
        keep = case.keep(inputs)
        truth, peer_out, out = truth[keep], peer_out.cpu()[keep], out.cpu()[keep]
    scale = truth.abs().max().item()
    tol = tolerance(dtype, scale, case.depth)
    del ours, peer
    return ParityResult(case.name, device, str(dtype).removeprefix("torch."), scale, tol, max_diff(out, truth),
                        max_diff(out, peer_out), max_diff(peer_out, truth))


def _peer(reference: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """A copy of the transformers model on device in dtype (the reference itself stays float32 CPU)."""
    import copy

    return copy.deepcopy(reference).to(device=device, dtype=dtype).eval()


# ---- greedy tokens --------------------------------------------------------------------------

def assert_same_greedy(ours: list[int], theirs: list[int], truth_logits: Callable[[list[int]], torch.Tensor],
                       tol: float, what: str = "") -> int:
    """Equal greedy tokens up to the first difference, which must be a tie at this precision:
    the truth's logits after the common prefix (`truth_logits(prefix)` -> [vocab]) put the two
    chosen tokens within 2 * tol. -> the number of equal leading tokens."""
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    if common == len(ours) == len(theirs):
        return common
    if common == min(len(ours), len(theirs)):
        raise AssertionError(f"{what}: one sequence stops early ({len(ours)} vs {len(theirs)} tokens) "
                             "with equal tokens before")
    logits = truth_logits(ours[:common]).float().cpu()
    a, b = ours[common], theirs[common]
    gap = abs(logits[a].item() - logits[b].item())
    assert gap <= 2 * tol, (f"{what}: token {common} differs ({a} vs {b}) where the float32 logits are "
                            f"{gap:.3g} apart, more than the 2 x {tol:.3g} two rounded runs can disagree by")
    return common


def greedy_parity(case: Case, directory: Path, reference: nn.Module, tokenizer, device: str, dtype: torch.dtype,
                  prompt: str = "The quick brown fox", new_tokens: int = 20) -> int:
    """Our pipeline's greedy tokens against transformers' generate on the same device in the same
    dtype; -> how many leading tokens are equal (all of them unless a tie is met)."""
    from harness import load_pipeline

    pipe = load_pipeline(directory, device=device, dtype=str(dtype).removeprefix("torch."))
    try:
        [result] = pipe.generate([prompt], {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
        ours = [t.token for t in result.sequences[0].tokens]
    finally:
        pipe.close()
    peer = _peer(reference, device, dtype)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        generated = peer.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    theirs = generated[0, len(prompt_ids):].tolist()
    scale_probe = case.inputs(reference, directory)
    with torch.no_grad():
        scale = reference(**scale_probe).logits.abs().max().item()
    tol = tolerance(dtype, scale, case.depth)

    def truth_logits(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return reference(torch.tensor([prompt_ids + prefix])).logits[0, -1]

    return assert_same_greedy(ours, theirs, truth_logits, tol, f"{case.name} {dtype} on {device}")
