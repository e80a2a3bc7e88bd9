"""The llama.cpp side of real_gemma.py, run by the llama-cpp-python virtualenv's own Python
(bench/generation/setup_llama_cpp builds it): the GGUF file loaded once with `Llama(model_path,
n_threads, n_threads_batch, n_ctx, n_batch, logits_all=False)`, then requests from the bench
(side_protocol.py).

Timing is what a llama-cpp-python user gets: `create_completion(prompt, max_tokens=N,
temperature=0, stream=True)`; TTFT is the call start to the first streamed chunk, the total the
call start to the last. The model state is reset before every call: llama-cpp-python otherwise
reuses the KV cache of a matching prompt prefix, and a repeated prompt would skip its prompt
pass.

Exactly N tokens: the completion stops at an end-of-generation token, and llama-cpp-python has
no min_tokens/ignore_eos. The token ids come from an untimed `generate()` with the same greedy
sampler; if an end-of-generation token appears among the first N, every end-of-generation
token gets a -inf logit bias (as pipeserve's and transformers' min_new_tokens mask the EOS
ids), which llama-cpp-python applies in Python on the whole vocabulary each step, so it is only
used when needed ("eos_banned" in the reply says which).
"""
from __future__ import annotations

import argparse
import time

from side_protocol import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--n-batch", type=int, default=512)
    args = parser.parse_args()

    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=args.n_ctx, n_batch=args.n_batch, logits_all=False, verbose=False)
    load_s = time.perf_counter() - start
    vocab = llm._model.vocab
    end_of_generation = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def prompt_ids(text: str) -> list[int]:
        # What create_completion feeds for a text prompt: BOS (the file says add_bos) + the text
        # tokenized with special tokens parsed.
        bos = [llm.token_bos()] if llm._model.add_bos_token() else []
        return bos + llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy_ids(ids: list[int], new_tokens: int, bias: dict | None) -> list[int]:
        processors = None
        if bias:
            def ban(_input_ids, scores):
                scores[list(bias)] = -float("inf")
                return scores
            processors = llama_cpp.LogitsProcessorList([ban])
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, logits_processor=processors):
            out.append(token)
            if len(out) == new_tokens:
                break
        return out

    greedy: dict[tuple[str, int], tuple[list[int], dict | None]] = {}  # once per prompt: untimed

    def generate(text: str, new_tokens: int) -> dict:
        ids = prompt_ids(text)
        if (text, new_tokens) not in greedy:
            tokens = greedy_ids(ids, new_tokens, None)
            bias = None
            if any(t in end_of_generation for t in tokens):
                bias = {t: -float("inf") for t in end_of_generation}
                tokens = greedy_ids(ids, new_tokens, bias)
            greedy[text, new_tokens] = tokens, bias
        tokens, bias = greedy[text, new_tokens]
        llm.reset()
        start = time.perf_counter()
        first = None
        pieces = []
        finish = None
        for chunk in llm.create_completion(text, max_tokens=new_tokens, temperature=0.0, repeat_penalty=1.0,
                                           logit_bias=bias, stream=True):
            if first is None:
                first = time.perf_counter() - start
            pieces.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
        seconds = time.perf_counter() - start
        text_out = "".join(pieces)
        if finish != "length":
            raise RuntimeError(f"the completion stopped early ({finish}) after {text_out!r}")
        expected = llm.detokenize(tokens, prev_tokens=ids).decode("utf-8", errors="replace")
        if text_out != expected:
            raise RuntimeError(f"streamed text {text_out!r} is not the greedy tokens' text {expected!r}")
        return {"ttft_s": first, "seconds": seconds, "ids": tokens, "text": text_out, "prompt_tokens": len(ids),
                "eos_banned": bias is not None}

    serve({
        "info": lambda: {"engine": "llama.cpp (llama-cpp-python)", "llama_cpp_python": llama_cpp.__version__,
                         "load_s": load_s, "threads": args.threads, "n_ctx": args.n_ctx, "n_batch": args.n_batch,
                         "system_info": llama_cpp.llama_print_system_info().decode(),
                         "end_of_generation_tokens": end_of_generation},
        "tokenize": lambda text: {"ids": prompt_ids(text)},
        "generate": generate,
    })


if __name__ == "__main__":
    main()
