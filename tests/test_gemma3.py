"""Gemma 3 text parity with transformers on tiny random checkpoints (generation_checkpoints.build
"gemma3": local layers with a 4-position window interleaved with a global layer): logits of a full
pass, logits through our KV cache whose local layers keep a ring of 4 positions (prompt chunks
longer than the ring, sequences of different lengths decoded together, generation far past the
window), greedy generation with the prompt's BOS, config variants, the legacy config layout and
the language model of a Gemma3ForConditionalGeneration checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from generation_checkpoints import GEMMA3_SMALL, build
from harness import PARITY_ATOL, assert_close, load_pipeline

from pipeserve.layers.kv_cache import KVCache

WINDOW = GEMMA3_SMALL["sliding_window"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3")
    model, tokenizer = build("gemma3", directory, special_tokens=True)
    pipe = load_pipeline(directory)
    yield model, tokenizer, pipe, directory
    pipe.close()


def _ids(model, shape, seed):
    return torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_layer_layout_is_what_the_case_needs(gemma):
    model, _, pipe, _ = gemma
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention", "sliding_attention"]
    assert pipe.model.layer_windows == [WINDOW, WINDOW, None, WINDOW, WINDOW]
    rope = model.config.rope_parameters
    assert rope["full_attention"]["rope_theta"] == 1000.0 and rope["full_attention"]["rope_type"] == "linear"
    assert rope["sliding_attention"]["rope_theta"] == 50.0


def test_logits_match_full_pass(gemma):
    model, _, pipe, _ = gemma
    ids = _ids(model, (2, 3 * WINDOW + 2), 1)  # well past the window
    with torch.no_grad():
        assert_close(pipe.model(ids), model(ids).logits)


def test_logits_through_ring_cache_match_and_local_layers_stay_bounded(gemma):
    model, _, pipe, _ = gemma
    ours = pipe.model
    ids = _ids(model, (2, 30), 2)
    with torch.no_grad():
        reference = model(ids).logits
        cache = KVCache(ours.num_layers, ours.kv_heads, ours.head_dim, ours.max_positions, initial_capacity=2,
                        windows=ours.layer_windows)
        a, b = cache.allocate(), cache.allocate()
        # a: chunks of 3 (inside the window), then 7 (longer than the ring: its early queries
        # need ring entries its late keys replace); b: one chunk of 2 (shorter than the ring).
        for start, end in ((0, 3), (3, 10)):
            view = cache.view([a], end - start)
            assert_close(ours(ids[:1, start:end], view), reference[:1, start:end])
            view.commit()
        view = cache.view([b], 2)
        assert_close(ours(ids[1:, :2], view), reference[1:, :2])
        view.commit()
        # decoded together (b first: slot order is not batch order), b crossing the window
        pos_a, pos_b = 10, 2
        while pos_a < 30:
            view = cache.view([b, a], 1)
            step = ours(torch.stack([ids[1, pos_b:pos_b + 1], ids[0, pos_a:pos_a + 1]]), view)
            view.commit()
            assert_close(step[0, 0], reference[1, pos_b])
            assert_close(step[1, 0], reference[0, pos_a])
            pos_a, pos_b = pos_a + 1, pos_b + 1
        # the global layer holds every position; each local layer only its window
        for layer, window in enumerate(ours.layer_windows):
            assert cache.keys[layer].shape[2] == (window if window else cache.capacity)
        assert cache.capacity >= 30
        copy = cache.allocate()
        cache.copy_slot(a, copy)  # num_return_sequences: a copied ring continues as the original
        view = cache.view([copy], 1)
        step = ours(ids[:1, 29:30], view)
        assert_close(step[0, 0], ours(ids[:1, 29:30], cache.view([a], 1))[0, 0])


def test_ring_memory_does_not_grow_with_the_generation(gemma):
    """Local layers' bytes stay at slots x window however long the sequence gets."""
    model, _, pipe, _ = gemma
    ours = pipe.model
    cache = KVCache(ours.num_layers, ours.kv_heads, ours.head_dim, ours.max_positions, initial_capacity=2,
                    windows=ours.layer_windows)
    slot = cache.allocate()
    local = [i for i, w in enumerate(ours.layer_windows) if w]
    sizes = []
    with torch.no_grad():
        view = cache.view([slot], 5)
        ours(_ids(model, (1, 5), 3), view)
        view.commit()
        for token in _ids(model, (100,), 4).tolist():
            view = cache.view([slot], 1)
            ours(torch.tensor([[token]]), view)
            view.commit()
            sizes.append(sum(cache.keys[i].numel() + cache.values[i].numel() for i in local))
    assert len(set(sizes)) == 1
    assert sizes[0] == 2 * len(local) * cache.slots * ours.kv_heads * WINDOW * ours.head_dim


def test_greedy_generation_matches_transformers(gemma):
    """Prompts longer than the window, 40 tokens (the ring wraps ten times), batched together;
    the prompt is tokenized as transformers' pipeline does, BOS first."""
    model, tokenizer, pipe, _ = gemma
    prompts = ["The quick brown fox jumps over the lazy dog.", "Hello world", "Numbers 0123456789 and"]
    expected = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        assert inputs["input_ids"][0, 0].item() == tokenizer.bos_token_id
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    results = pipe.generate(prompts, {"max_new_tokens": 40, "min_new_tokens": 40})
    for prompt, result, tokens in zip(prompts, results, expected):
        assert result.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert [t.token for t in result.sequences[0].tokens] == tokens, prompt
    assert len(tokenizer(prompts[0])["input_ids"]) > WINDOW
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt_ids = tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    sequence = torch.cat([prompt_ids, torch.tensor([expected[1]])], dim=1)
    [record] = reference.postprocess({"generated_sequence": sequence.unsqueeze(0), "input_ids": prompt_ids,
                                      "prompt_text": prompts[1]})
    assert results[1].sequences[0].text == record["generated_text"]


VARIANTS = {
    "final_logit_softcapping": {"final_logit_softcapping": 0.5},
    "query_pre_attn_scalar": {"query_pre_attn_scalar": 3},
    "rope_scaling-off": {"rope_scaling": None},
    "layer_types": {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                                    "sliding_attention"]},
    "num_key_value_heads": {"num_key_value_heads": 2},
    "attention_bias": {"attention_bias": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_matches_transformers(variant, gemma, tmp_path):
    model, _ = build("gemma3", tmp_path, special_tokens=True, **VARIANTS[variant])
    ids = _ids(model, (2, 14), 5)
    with torch.no_grad():
        expected = model(ids).logits
        # The same weights under the base config: the setting must change transformers' output.
        base_config = model.config.to_dict()
        for key in VARIANTS[variant]:
            key = "rope_parameters" if key == "rope_scaling" else key
            base_config[key] = getattr(gemma[0].config, key)
        base = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**base_config)).eval()
        if all(base.state_dict()[k].shape == v.shape for k, v in model.state_dict().items() if k in base.state_dict()):
            base.load_state_dict(model.state_dict(), strict=False)
            assert (expected - base(ids).logits).abs().max() > 100 * PARITY_ATOL, "the variant changes nothing"
    pipe = load_pipeline(tmp_path)
    try:
        with torch.no_grad():
            assert_close(pipe.model(ids), expected)
        [result] = pipe.generate(["The quick brown fox"], {"max_new_tokens": 12, "min_new_tokens": 12})
        inputs = model.generate(torch.tensor([pipe.encode("The quick brown fox")]), max_new_tokens=12,
                                min_new_tokens=12, do_sample=False)
        assert [t.token for t in result.sequences[0].tokens] == inputs[0, -12:].tolist()
    finally:
        pipe.close()


def test_legacy_config_layout(gemma, tmp_path):
    """Configs written before transformers 5 (the Hub's Gemma 3 ones) carry rope_theta,
    rope_local_base_freq and rope_scaling instead of rope_parameters."""
    model, _, _, directory = gemma
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters")
    config.pop("layer_types")
    config.update(rope_theta=1000.0, rope_local_base_freq=50.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    pipe = load_pipeline(tmp_path)
    try:
        ids = _ids(model, (1, 16), 6)
        with torch.no_grad():
            assert_close(pipe.model(ids), model(ids).logits)
    finally:
        pipe.close()


def test_conditional_generation_checkpoint_serves_its_language_model(gemma, tmp_path):
    """A gemma3 (multimodal) checkpoint: model_type gemma3, the text config nested, the language
    model's weights under model.language_model.*, a vision tower we do not load."""
    model, _, _, directory = gemma
    text = json.loads((directory / "config.json").read_text())
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    full = transformers.Gemma3ForConditionalGeneration(config).eval()
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("model.language_model.")}
    state.update({f"model.language_model.{k.removeprefix('model.')}": v
                  for k, v in load_file(str(directory / "model.safetensors")).items()})
    full.load_state_dict(state, strict=False)
    full.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(".vision_tower." in "." + k for k in saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    ids = _ids(model, (1, 12), 7)
    with torch.no_grad():
        expected = full(input_ids=ids).logits
    assert_close(expected, model(ids).logits)  # the language model is the text checkpoint's
    # Both layouts: transformers 5.25 writes language_model.model.* / vision_tower.* (as 4.x did),
    # its in-memory names (and other writers) are model.language_model.* / model.vision_tower.*.
    legacy = any(k.startswith("language_model.model.") for k in saved)
    other = {_swap_layout(k, legacy): v for k, v in saved.items()}
    # without generation_config.json the end-of-sequence ids come from the nested text config
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    for state in (saved, other):
        save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        pipe = load_pipeline(tmp_path)
        try:
            assert pipe.task.value == "text-generation"
            assert pipe.eos_ids == [model.config.eos_token_id]
            with torch.no_grad():
                assert_close(pipe.model(ids), expected)
        finally:
            pipe.close()


def _swap_layout(name: str, legacy: bool) -> str:
    pairs = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    for old, new in pairs:
        old, new = (old, new) if legacy else (new, old)
        if name.startswith(old):
            return new + name[len(old):]
    return name


def test_bfloat16_matches_transformers_in_bfloat16(gemma):
    """bfloat16 weights, cache and activations (the embedding scale rounded to bfloat16, the
    norms in float32, as transformers): logits within harness.reduced_precision_tolerance of
    transformers in bfloat16, greedy tokens equal up to the first rounding tie."""
    import copy

    from harness import assert_close_in_precision, assert_same_greedy_tokens

    model, _, _, directory = gemma
    reference_low = copy.deepcopy(model).to(torch.bfloat16)
    pipe = load_pipeline(directory, dtype="bfloat16")
    try:
        assert pipe.engine.cache.dtype == torch.bfloat16
        prompt = "The quick brown fox jumps over the lazy dog."
        ids = torch.tensor([pipe.encode(prompt)])
        with torch.no_grad():
            tol = assert_close_in_precision(pipe.model(ids), reference_low(ids).logits, model(ids).logits,
                                            torch.bfloat16)
            generated = reference_low.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                               output_scores=True, return_dict_in_generate=True,
                                               pad_token_id=model.config.eos_token_id)
        [result] = pipe.generate([prompt], {"max_new_tokens": 12, "min_new_tokens": 12})
        assert_same_greedy_tokens([t.token for t in result.sequences[0].tokens],
                                  generated.sequences[0, ids.shape[1]:].tolist(),
                                  [score[0] for score in generated.scores], tol, at_least=4)
    finally:
        pipe.close()


def test_load_passes_apply_to_gemma(gemma):
    """The post-load passes take Gemma as every causal LM: int8 weights (every projection
    quantized, per-row int8 activations where the CPU has oneDNN's int8 kernel, fewer bytes,
    still generating) and a device map (same text as without)."""
    from torch import nn

    from pipeserve.layers.quantization import Int8Linear
    from pipeserve.layers.row_int8 import RowInt8Linear, available

    _, _, plain, directory = gemma
    int8 = load_pipeline(directory, load_in_8bit=True)
    auto = load_pipeline(directory, device="auto")
    try:
        kind = RowInt8Linear if available() else Int8Linear
        assert any(isinstance(m, kind) for m in int8.model.modules())
        # every block linear quantized; the tied head stays the embedding's float32 weight
        # (greedy rows read it through the int8 screen, the others exactly)
        assert [n for n, m in int8.model.named_modules() if isinstance(m, nn.Linear)] in ([], ["lm_head"])
        assert int8.memory_bytes() < plain.memory_bytes()
        options = {"max_new_tokens": 12, "min_new_tokens": 12}
        assert int8.generate(["Hello world"], options)[0].sequences[0].generated_tokens == 12
        assert auto.model.layer_devices == [torch.device("cpu")] * auto.model.num_layers
        assert auto.generate(["Hello world"], options)[0].sequences[0].text == \
            plain.generate(["Hello world"], options)[0].sequences[0].text
    finally:
        int8.close()
        auto.close()


@pytest.mark.parametrize("change", [
    {"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "sliding_attention",
                     "sliding_attention"]},
    {"layer_types": ["full_attention"]},
    {"layer_types": None, "sliding_window_pattern": 0},
    {"sliding_window": 0},
    {"num_key_value_heads": 3},
    {"use_bidirectional_attention": True},
    {"hidden_activation": "no_such_activation"},
])
def test_unservable_configs_are_refused_at_load(gemma, tmp_path, change):
    from pipeserve.errors import ModelLoadFailed

    directory = gemma[3]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadFailed) as caught:
        load_pipeline(tmp_path)
    assert caught.value.reason == "UNSUPPORTED_CONFIG"
