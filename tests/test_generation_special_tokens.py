"""Prompts are tokenized as transformers' text-generation pipeline tokenizes them: with the
tokenizer's defaults, so tokenizer.json's post-processor decides what is added. Llama and Gemma 3
put their BOS first, OPT its BOS (here its one special token), GPT-2 nothing. Each family's
tokenizer here carries its real post-processor (generation_checkpoints, special_tokens=True), and
the reference is transformers' pipeline on the tokenizer read back from the saved files."""
from __future__ import annotations

import pytest
import torch
import transformers

from generation_checkpoints import build
from harness import load_pipeline

PROMPTS = ["The quick brown fox", "Hello world, this"]
ADDS_BOS = {"llama": True, "opt": True, "gemma3": True, "gpt2": False}


@pytest.mark.parametrize("family", list(ADDS_BOS))
def test_prompt_ids_and_text_match_the_transformers_pipeline(family, tmp_path):
    model, _ = build(family, tmp_path, special_tokens=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe = load_pipeline(tmp_path)
    try:
        for prompt in PROMPTS:
            expected_ids = reference.preprocess(prompt)["input_ids"][0].tolist()
            bare = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            # the case means something: BOS families differ from the bare ids by their BOS
            assert expected_ids == ([tokenizer.bos_token_id] + bare if ADDS_BOS[family] else bare)
            assert pipe.encode(prompt) == expected_ids
            [result] = pipe.generate([prompt], {"max_new_tokens": 12, "min_new_tokens": 12})
            assert result.prompt_tokens == len(expected_ids)
            with torch.no_grad():
                generated = model.generate(torch.tensor([expected_ids]), max_new_tokens=12, min_new_tokens=12,
                                           do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert [t.token for t in result.sequences[0].tokens] == generated[0, len(expected_ids):].tolist()
            [record] = reference(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert result.sequences[0].text == record["generated_text"]
    finally:
        pipe.close()
