"""GGUF checkpoints (llama.cpp's format) load like a safetensors directory, and match
transformers loading the same file (from_pretrained(dir, gguf_file=...)): a tiny random Llama
(q/k rows permuted as llama.cpp does) and a tiny random Gemma 3 (norms stored as 1 + weight),
written with the `gguf` writer in F32 and in Q8_0, give the same logits (within 1e-4) and greedy
tokens; the tokenizer built from the GGUF metadata gives the same ids on a varied text sample;
LoadModel serves the file over gRPC."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from gguf_checkpoints import build_gemma3_gguf, build_llama_gguf
from harness import PARITY_ATOL, assert_close, load_pipeline
from pipeserve.layers import grid_native

# Text that exercises the tokenizer: the first-word prefix space, runs of spaces, newlines and
# tabs, accents and emoji (byte fallback: the tiny vocabulary lacks most of them), CJK, the
# special tokens written in the text, and characters near <0xNN> tokens' own spelling.
SAMPLE = [
    "Hello world",
    " Hello  world   with    spaces",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé: accents and emoji 🙂 test UTF-8 handling.",
    "line one\nline two\n\n\ttabbed",
    "日本語のテキスト and 中文",
    "<s> a bos in the text </s> and an eos <unk>",
    "<bos>Gemma's own <eos> specials <pad> and <mask>",
    "<0x41> is not the byte A",
    "Numbers 0123456789 and punctuation !?.,;: appear too.",
    "▁already▁metaspaced",
    "a",
    "",
]


BUILDERS = {"llama": build_llama_gguf, "gemma3": build_gemma3_gguf}


@pytest.fixture(scope="module", params=["llama-F32", "llama-Q8_0", "gemma3-F32", "gemma3-Q8_0"])
def tiny_gguf(request, tmp_path_factory):
    family, qtype = request.param.split("-")
    path, original = BUILDERS[family](tmp_path_factory.mktemp(f"gguf-{request.param}"), qtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    # the directory holding the file, as LoadModel names it; float weights for exact parity (a
    # quantized file defaults to grouped)
    pipe = load_pipeline(path.parent, load_in_8bit=False)
    pipe.original = original  # the transformers model the file was written from
    yield qtype, path, reference, pipe
    pipe.close()


def test_weights_are_the_ones_written_q_k_rows_unpermuted(tiny_gguf):
    """F32: every weight equals the Hugging Face checkpoint the file was converted from, so
    llama.cpp's changes are undone exactly: Llama's q/k row permutation (a wrong order would
    still run) and Gemma's 1 + weight norms."""
    from pipeserve.checkpoints.formats import read_checkpoint

    qtype, _, _, pipe = tiny_gguf
    # the checkpoint as the families receive it (the loaded model fuses q/k/v afterwards)
    ours = read_checkpoint(pipe.files, device="cpu", dtype=torch.float32).state
    expected = dict(pipe.original.named_parameters())
    if pipe.original.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert set(ours) == set(expected)
    gemma = pipe.files.config["model_type"].startswith("gemma")
    for name, weight in expected.items():
        if gemma and name.endswith("norm.weight"):
            # stored as float32(1 + w), read back as that - 1: rounded at the scale of 1
            assert (ours[name] - weight.detach()).abs().max().item() <= torch.finfo(torch.float32).eps, name
        elif qtype == "F32" or weight.dim() == 1:
            assert torch.equal(ours[name].detach(), weight.detach()), name
        else:  # Q8_0: one scale per 32 values, 8-bit steps
            step = weight.detach().abs().max().item() / 127
            assert (ours[name].detach() - weight.detach()).abs().max().item() <= step, name


def test_logits_match_transformers_loading_the_same_file(tiny_gguf):
    _, _, reference, pipe = tiny_gguf
    torch.manual_seed(1)
    ids = torch.randint(3, reference.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        assert_close(pipe.model(ids), expected, atol=PARITY_ATOL)
    assert expected.std() > 0.1, "a random model whose logits are nearly constant could not show a wrong weight"


def test_config_comes_from_the_metadata(tiny_gguf):
    _, path, reference, pipe = tiny_gguf
    config = pipe.files.config
    assert config["model_type"] == reference.config.model_type
    assert config["architectures"] == [type(reference).__name__]
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(reference.config, key), key
    assert config["rms_norm_eps"] == pytest.approx(reference.config.rms_norm_eps, rel=0)
    rope = reference.config.rope_parameters
    assert config["rope_theta"] == rope.get("full_attention", rope)["rope_theta"]
    if "sliding_window" in config:
        assert config["sliding_window"] == reference.config.sliding_window
        assert pipe.model.layer_windows == [reference.config.sliding_window if t == "sliding_attention" else None
                                            for t in reference.config.layer_types]


def test_greedy_generation_matches_transformers(tiny_gguf):
    _, _, reference, pipe = tiny_gguf
    for prompt in ["The quick brown fox", "Hello world, this is", "Café 🙂"]:
        prompt_ids = pipe.encode(prompt)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                          dtype=torch.long), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                          pad_token_id=reference.config.eos_token_id)
        [result] = pipe.generate([prompt], {"max_new_tokens": 30, "min_new_tokens": 30})
        assert [t.token for t in result.sequences[0].tokens] == expected[0, len(prompt_ids):].tolist(), prompt


def test_the_file_itself_loads_too(tiny_gguf):
    qtype, path, reference, _ = tiny_gguf
    pipe = load_pipeline(path, load_in_8bit=False)
    try:
        assert pipe.files.gguf == path.resolve()
        ids = torch.arange(3, 19).reshape(1, -1)
        with torch.no_grad():
            assert_close(pipe.model(ids), reference(ids).logits)
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def tokenizers_pair(tiny_gguf):
    from tokenizers import Tokenizer

    _, path, _, pipe = tiny_gguf
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_str(pipe.files.tokenizer_json()), reference


@pytest.mark.parametrize("text", SAMPLE)
def test_tokenizer_ids_match_transformers(tokenizers_pair, text):
    ours, reference = tokenizers_pair
    for special in (True, False):
        expected = reference(text, add_special_tokens=special)["input_ids"]
        assert ours.encode(text, add_special_tokens=special).ids == expected, (text, special)
    ids = reference(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_tokenizer_sample_covers_byte_fallback_and_special_tokens(tokenizers_pair):
    """The sample is only a test if it reaches the hard paths: <0xNN> tokens for characters the
    vocabulary lacks, and special tokens matched whole inside the text."""
    ours, reference = tokenizers_pair
    tokens = [t for text in SAMPLE for t in ours.encode(text).tokens]
    assert any(t.startswith("<0x") for t in tokens)
    assert tokens.count(reference.bos_token) > len(SAMPLE) and reference.eos_token in tokens
    assert ours.encode("x").ids[0] == reference.bos_token_id, "add_bos_token from the metadata"


def test_tokenizer_json_is_the_one_transformers_builds(tiny_gguf):
    _, path, _, pipe = tiny_gguf
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert json.loads(pipe.files.tokenizer_json()) == json.loads(reference.backend_tokenizer.to_str())


def test_loadmodel_serves_a_gguf_file_over_grpc(grpc_server, tiny_gguf):
    from grpc_testing import load_model
    from pipeserve.v1 import model_pb2, text_generation_pb2_grpc
    from pipeserve.v1 import text_generation_pb2 as pb

    qtype, path, _, pipe = tiny_gguf
    info = load_model(grpc_server, path)
    assert not info.quantized_int8, "GGUF files load int8 only when LoadModel asks for it"
    # the source's default: a quantized file keeps its own grids where pipeserve's kernels run
    # them (runtime/loading.with_source_defaults), a float file loads float
    grouped = qtype != "F32" and grid_native.available()
    assert info.quantization == (model_pb2.QUANTIZATION_GROUPED if grouped else model_pb2.QUANTIZATION_NONE)
    if grouped:
        pipe = load_pipeline(path, quantization="grouped")  # what the server holds, to compare with
    assert info.task == model_pb2.TASK_TEXT_GENERATION and info.family == pipe.files.config["model_type"]
    assert info.source_path == str(path.resolve()), "GetModel names the file it serves, not only its folder"
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(grpc_server.channel)
    response = stub.Generate(pb.GenerateRequest(model=str(path), prompt="The quick brown fox",
                                                options=pb.GenerationOptions(max_new_tokens=8, min_new_tokens=8)),
                             timeout=120)
    [expected] = pipe.generate(["The quick brown fox"], {"max_new_tokens": 8, "min_new_tokens": 8})
    if grouped:
        pipe.close()
    assert response.sequences[0].text == expected.sequences[0].text
    assert response.sequences[0].generated_tokens == 8
