"""Sampling options with transformers' semantics, seeded reproducibility, stop sequences and
incremental detokenization."""
from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as lp

from generation_checkpoints import build
from harness import load_pipeline

from pipeserve.scheduling import generation as g


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2-sampling")
    model, tokenizer = build("gpt2", directory)
    pipe = load_pipeline(directory)
    yield model, tokenizer, pipe
    pipe.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-sampling")
    model, tokenizer = build("llama", directory)
    pipe = load_pipeline(directory)
    yield model, tokenizer, pipe
    pipe.close()


# ---- processors, one by one, against transformers' classes ---------------------------------

def _scores_and_ids():
    torch.manual_seed(3)
    return torch.randn(1, 50) * 3, torch.randint(0, 50, (1, 30))


@pytest.mark.parametrize("case", ["repetition", "ngram", "min_new", "temperature", "top_k", "top_p", "typical"])
def test_processor_equals_transformers(case):
    scores, ids = _scores_and_ids()
    ours, theirs = {
        "repetition": (lambda: g.repetition_penalty(ids, scores, 1.3),
                       lambda: lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())),
        "ngram": (lambda: g.no_repeat_ngram(torch.cat([ids, ids[:, :2]], 1), scores, 3),
                  lambda: lp.NoRepeatNGramLogitsProcessor(3)(torch.cat([ids, ids[:, :2]], 1), scores.clone())),
        "min_new": (lambda: g.min_new_tokens(scores, [7, 9], 3, 5),
                    lambda: lp.MinNewTokensLengthLogitsProcessor(27, 5, [7, 9])(ids, scores.clone())),
        "temperature": (lambda: scores / 0.7, lambda: lp.TemperatureLogitsWarper(0.7)(ids, scores.clone())),
        "top_k": (lambda: g.top_k_filter(scores, 5), lambda: lp.TopKLogitsWarper(5)(ids, scores.clone())),
        "top_p": (lambda: g.top_p_filter(scores, 0.8), lambda: lp.TopPLogitsWarper(0.8)(ids, scores.clone())),
        "typical": (lambda: g.typical_filter(scores, 0.6), lambda: lp.TypicalLogitsWarper(0.6)(ids, scores.clone())),
    }[case]
    expected = theirs()
    got = ours()
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got, expected)
    if case in ("ngram", "min_new", "top_k", "top_p", "typical"):
        assert torch.isinf(got).any(), "the case must actually filter something"


# ---- whole sampled generations against transformers' generate --------------------------------

SAMPLING_CASES = [
    {"do_sample": True},
    {"do_sample": True, "temperature": 0.7, "top_k": 10},
    {"do_sample": True, "top_k": 0, "top_p": 0.9},
    {"do_sample": True, "top_k": 0, "typical_p": 0.8},
    {"do_sample": True, "temperature": 1.3, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.2,
     "no_repeat_ngram_size": 2},
    {"do_sample": False, "repetition_penalty": 1.5, "no_repeat_ngram_size": 3},
]


@pytest.mark.parametrize("case", range(len(SAMPLING_CASES)))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_seeded_sampling_equals_transformers(case, family, request):
    model, tokenizer, pipe = request.getfixturevalue(family)
    options = dict(SAMPLING_CASES[case], max_new_tokens=25, min_new_tokens=25)
    prompt = "The quick brown fox"
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    for seed in (0, 1234):
        torch.manual_seed(seed)  # transformers samples from the global generator
        with torch.no_grad():
            expected = model.generate(**inputs, **options, pad_token_id=tokenizer.eos_token_id)
        expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
        [result] = pipe.generate([prompt], dict(options, seed=seed))
        assert [t.token for t in result.sequences[0].tokens] == expected
        assert result.seed == (seed if options["do_sample"] else 0)  # greedy: no seed


def test_same_seed_same_output_alone_or_batched(gpt2):
    _, _, pipe = gpt2
    options = {"do_sample": True, "max_new_tokens": 20, "seed": 42, "top_k": 0}
    [alone] = pipe.generate(["Hello world"], options)
    # the same request among others, which run in the same decoding steps
    results = pipe.generate(["The quick", "Hello world", "Numbers 0123"], options)
    assert results[1].sequences[0].text == alone.sequences[0].text
    [again] = pipe.generate(["Hello world"], options)
    assert again.sequences[0].text == alone.sequences[0].text
    [other] = pipe.generate(["Hello world"], dict(options, seed=43))
    assert other.sequences[0].text != alone.sequences[0].text


def test_unset_seed_is_reported_and_replays(gpt2):
    _, _, pipe = gpt2
    options = {"do_sample": True, "max_new_tokens": 15}
    [first] = pipe.generate(["Hello"], options)
    [replay] = pipe.generate(["Hello"], dict(options, seed=first.seed))
    assert replay.sequences[0].text == first.sequences[0].text


def test_num_return_sequences_use_consecutive_seeds(gpt2):
    _, _, pipe = gpt2
    [many] = pipe.generate(["Hello"], {"do_sample": True, "num_return_sequences": 3, "seed": 7, "max_new_tokens": 12})
    assert len(many.sequences) == 3
    for i, seq in enumerate(many.sequences):
        [single] = pipe.generate(["Hello"], {"do_sample": True, "seed": 7 + i, "max_new_tokens": 12})
        assert seq.text == single.sequences[0].text


def test_logprobs_are_the_models_distribution(gpt2):
    model, tokenizer, pipe = gpt2
    [result] = pipe.generate(["Hello world"], {"max_new_tokens": 3, "logprobs": 3})
    tokens = result.sequences[0].tokens
    ids = tokenizer("Hello world", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1], -1)
    assert abs(tokens[0].logprob - float(logp[tokens[0].token])) < 1e-4
    assert [i for i, _ in tokens[0].top] == torch.topk(logp, 3).indices.tolist()
    assert tokens[0].top[0][0] == tokens[0].token  # greedy picks the top alternative


# ---- stop sequences and streaming ---------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stop_sequence_spanning_tokens(family, request):
    _, tokenizer, pipe = request.getfixturevalue(family)
    prompt = "Hello world, this"
    options = {"max_new_tokens": 40, "min_new_tokens": 40, "return_full_text": False}
    [full] = pipe.generate([prompt], options)
    text = full.sequences[0].text
    tokens = full.sequences[0].tokens
    # a stop string made of the end of one token's text and the start of a later one's
    pieces = [t.text for t in tokens]
    start = next(i for i in range(3, len(pieces)) if len(pieces[i]) >= 1 and len("".join(pieces[i + 1:i + 3])) >= 1)
    at = len("".join(pieces[:start])) + len(pieces[start]) - 1
    stop = text[at:at + 1 + len("".join(pieces[start + 1:start + 3]))]
    assert len(stop) >= 2
    first = text.find(stop)
    events = list(pipe.stream(prompt, dict(options, stop=[stop])))
    done = events[-1]
    assert done.finish_reason == "stop_sequence"
    assert done.text == text[:first]
    assert "".join(e.text for e in events[:-1]) == done.text


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_streamed_text_equals_final_text(family, request):
    _, _, pipe = request.getfixturevalue(family)
    for options in ({"max_new_tokens": 40}, {"do_sample": True, "seed": 5, "max_new_tokens": 40},
                    {"do_sample": True, "seed": 6, "max_new_tokens": 40, "return_full_text": False}):
        events = list(pipe.stream("Café naïve 🙂", options))
        done = events[-1]
        new_text = "".join(e.text for e in events[:-1])
        expected = ("Café naïve 🙂" if options.get("return_full_text", True) else "") + new_text
        assert done.text == expected
        [whole] = pipe.generate(["Café naïve 🙂"], options)
        assert whole.sequences[0].text == done.text


# ---- the detokenizer on its own ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_incremental_detokenizer_never_emits_half_characters(family, request):
    from tokenizers import Tokenizer

    _, hf_tokenizer, _ = request.getfixturevalue(family)
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    text = "Café résumé 🙂 naïve emoji 🙂🙂 done."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split()), "multi-byte characters span several tokens"
    stream = g.TextStream(tokenizer)
    pieces = [stream.push(i)[0] for i in ids]
    pieces.append(stream.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stop_prefix_is_held_back_then_released():
    class Chars:  # one character per token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    stream = g.TextStream(Chars(), stop=["END", "xyz"])
    out = [stream.push(ord(c)) for c in "abEN"]
    assert [p for p, _ in out] == ["a", "b", "", ""]  # "EN" could become "END"
    assert stream.push(ord("x")) == ("EN", False)  # "ENx" cannot become "END"; "x" may start "xyz"
    assert stream.push(ord("y")) == ("", False)
    assert stream.push(ord("z")) == ("", True)
    assert stream.text == "abEN"
    assert stream.push(ord("q")) == ("", True)


def test_clean_up_tokenization_spaces_never_rewrites_released_text():
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    stream = g.TextStream(Chars(), clean_up_spaces=True)
    pieces = [stream.push(ord(c))[0] for c in "I do n't know . Yes"]
    pieces.append(stream.finish())
    assert "".join(pieces) == g.clean_up_tokenization("I do n't know . Yes") == "I don't know. Yes"


def test_byte_fallback_runs_are_held_until_they_end(llama):
    """Metaspace + ByteFallback: a run of <0xNN> tokens that is not valid UTF-8 decodes to one
    U+FFFD per byte, so "Q" from <0x51> becomes U+FFFD once <0xE2> follows it. The stream must
    never have released the "Q"."""
    from tokenizers import Tokenizer

    _, hf_tokenizer, _ = llama
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    byte_ids = g.byte_fallback_tokens(tokenizer)
    assert len(byte_ids) == 256
    vocab = tokenizer.get_vocab()
    ids = [vocab["▁the"] if "▁the" in vocab else vocab["▁"], vocab["<0x51>"], vocab["<0xE2>"], vocab["<0x7E>"],
           vocab["<0xC3>"], vocab["<0xA9>"], vocab["▁"], vocab["<0xF0>"]]
    expected = tokenizer.decode(ids)
    stream = g.TextStream(tokenizer, byte_tokens=byte_ids)
    released = ""
    for token in ids:
        released += stream.push(token)[0]
        assert expected.startswith(released)
    released += stream.finish()
    assert released == expected
    assert "Q" not in expected  # the run turned it into replacement characters


def test_batched_prompts_equal_transformers_batched_pipeline(gpt2):
    """Several prompts in one call (different lengths) give transformers.pipeline's results
    for the same list with batch_size and left padding."""
    import transformers

    model, tokenizer, pipe = gpt2
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    prompts = ["The quick brown fox", "Hello", "Numbers 0123456789 and punctuation"]
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = reference(prompts, batch_size=3, max_new_tokens=15, min_new_tokens=15, do_sample=False)
    ours = pipe.generate(prompts, {"max_new_tokens": 15, "min_new_tokens": 15})
    assert [r.sequences[0].text for r in ours] == [e[0]["generated_text"] for e in expected]


def test_greedy_reports_no_seed(gpt2):
    """A seed means something only for sampling: greedy decoding reports 0, set or not."""
    _, _, pipe = gpt2
    [unset] = pipe.generate(["Hello"], {"max_new_tokens": 3})
    [given] = pipe.generate(["Hello"], {"max_new_tokens": 3, "seed": 77})
    assert unset.seed == given.seed == 0
    assert given.sequences[0].text == unset.sequences[0].text
    [sampled] = pipe.generate(["Hello"], {"max_new_tokens": 3, "do_sample": True})
    assert sampled.seed != 0
