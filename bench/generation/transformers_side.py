"""The transformers side of real_gemma.py, in its own process of the project's virtualenv:
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` (transformers
dequantizes the GGUF file to float32, as pipeserve's float path does) and its GGUF tokenizer,
then requests from the bench (side_protocol.py).

`generate` decodes greedily (do_sample=False, num_beams=1) exactly N tokens (min_new_tokens =
max_new_tokens). TTFT is the call start to the streamer receiving the first new token (the
streamer gets the prompt first, then each new token as it is chosen), so one call gives both
TTFT and the total. The server's OpenMP settings and the same torch thread count as the
server's compute lane.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "service"))

from pipeserve.serving.openmp_defaults import apply_openmp_defaults  # noqa: E402

apply_openmp_defaults()  # before torch loads, as the server does

from side_protocol import serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path, help="the .gguf file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.model.parent), gguf_file=args.model.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)

    class FirstToken(BaseStreamer):
        """Records when generate hands over its first new token (the first put is the prompt)."""

        def __init__(self):
            self.puts = 0
            self.first_at = None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first_at = time.perf_counter()

        def end(self):
            pass

    def generate(text: str, new_tokens: int) -> dict:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        streamer = FirstToken()
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, num_beams=1, streamer=streamer)
            seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        assert len(new) == new_tokens, len(new)
        return {"ttft_s": streamer.first_at - start, "seconds": seconds, "ids": new,
                "text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1]}

    serve({
        "info": lambda: {"engine": "transformers", "transformers": transformers.__version__,
                         "torch": torch.__version__, "load_s": load_s, "threads": torch.get_num_threads()},
        "tokenize": lambda text: {"ids": tokenizer(text)["input_ids"]},
        "generate": generate,
    })


if __name__ == "__main__":
    main()
