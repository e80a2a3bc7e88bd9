"""GGUF checkpoints (llama.cpp's format) load like a safetensors directory, and match
transformers loading the same file (from_pretrained(dir, gguf_file=...)): a tiny random Llama
written with the `gguf` writer (q/k rows permuted as llama.cpp does) in F32 and in Q8_0 gives
the same logits (within 1e-4) and greedy tokens; the tokenizer built from the GGUF metadata
gives the same ids on a varied text sample; LoadModel serves it over gRPC."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from gguf_checkpoints import build_llama_gguf
from harness import PARITY_ATOL, assert_close, load_pipeline

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
    "<0x41> is not the byte A",
    "Numbers 0123456789 and punctuation !?.,;: appear too.",
    "▁already▁metaspaced",
    "a",
    "",
]


@pytest.fixture(scope="module", params=["F32", "Q8_0"])
def llama_gguf(request, tmp_path_factory):
    path, original = build_llama_gguf(tmp_path_factory.mktemp(f"gguf-{request.param}"), request.param)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    pipe = load_pipeline(path.parent)  # the directory holding the file, as LoadModel names it
    pipe.original = original  # the transformers model the file was written from
    yield request.param, path, reference, pipe
    pipe.close()


def test_weights_are_the_ones_written_q_k_rows_unpermuted(llama_gguf):
    """F32: every weight equals the Hugging Face checkpoint the file was converted from, so
    llama.cpp's q/k row permutation is undone exactly (a wrong order would still run)."""
    from pipeserve.checkpoints.formats import read_checkpoint

    qtype, _, _, pipe = llama_gguf
    # the checkpoint as the families receive it (the loaded model fuses q/k/v afterwards)
    ours = read_checkpoint(pipe.files, device="cpu", dtype=torch.float32).state
    assert set(ours) == set(pipe.original.state_dict())
    for name, weight in pipe.original.named_parameters():
        if qtype == "F32" or weight.dim() == 1:
            assert torch.equal(ours[name].detach(), weight.detach()), name
        else:  # Q8_0: one scale per 32 values, 8-bit steps
            step = weight.detach().abs().max().item() / 127
            assert (ours[name].detach() - weight.detach()).abs().max().item() <= step, name


def test_logits_match_transformers_loading_the_same_file(llama_gguf):
    _, _, reference, pipe = llama_gguf
    torch.manual_seed(1)
    ids = torch.randint(3, reference.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        assert_close(pipe.model(ids), expected, atol=PARITY_ATOL)
    assert expected.std() > 0.1, "a random model whose logits are nearly constant could not show a wrong weight"


def test_config_comes_from_the_metadata(llama_gguf):
    _, path, reference, pipe = llama_gguf
    config = pipe.files.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(reference.config, key), key
    assert config["rms_norm_eps"] == pytest.approx(reference.config.rms_norm_eps, rel=0)
    assert config["rope_theta"] == reference.config.rope_parameters["rope_theta"]


def test_greedy_generation_matches_transformers(llama_gguf):
    _, _, reference, pipe = llama_gguf
    for prompt in ["The quick brown fox", "Hello world, this is", "Café 🙂"]:
        prompt_ids = pipe.encode(prompt)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                          dtype=torch.long), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                          pad_token_id=reference.config.eos_token_id)
        [result] = pipe.generate([prompt], {"max_new_tokens": 30, "min_new_tokens": 30})
        assert [t.token for t in result.sequences[0].tokens] == expected[0, len(prompt_ids):].tolist(), prompt


def test_the_file_itself_loads_too(llama_gguf):
    qtype, path, reference, _ = llama_gguf
    pipe = load_pipeline(path)
    try:
        assert pipe.files.gguf == path.resolve()
        ids = torch.arange(3, 19).reshape(1, -1)
        with torch.no_grad():
            assert_close(pipe.model(ids), reference(ids).logits)
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def tokenizers_pair(llama_gguf):
    from tokenizers import Tokenizer

    _, path, _, pipe = llama_gguf
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
    assert tokens.count("<s>") > len([t for t in SAMPLE]) and "</s>" in tokens
    assert ours.encode("x").ids[0] == reference.bos_token_id, "add_bos_token from the metadata"


def test_tokenizer_json_is_the_one_transformers_builds(llama_gguf):
    _, path, _, pipe = llama_gguf
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert json.loads(pipe.files.tokenizer_json()) == json.loads(reference.backend_tokenizer.to_str())


def test_loadmodel_serves_a_gguf_file_over_grpc(grpc_server, llama_gguf):
    from grpc_testing import load_model
    from pipeserve.v1 import model_pb2, text_generation_pb2_grpc
    from pipeserve.v1 import text_generation_pb2 as pb

    qtype, path, _, pipe = llama_gguf
    info = load_model(grpc_server, path)
    assert info.task == model_pb2.TASK_TEXT_GENERATION and info.family == "llama"
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(grpc_server.channel)
    response = stub.Generate(pb.GenerateRequest(model=str(path), prompt="The quick brown fox",
                                                options=pb.GenerationOptions(max_new_tokens=8, min_new_tokens=8)),
                             timeout=120)
    [expected] = pipe.generate(["The quick brown fox"], {"max_new_tokens": 8, "min_new_tokens": 8})
    assert response.sequences[0].text == expected.sequences[0].text
    assert response.sequences[0].generated_tokens == 8
