"""A 262144 x 640 tied head (Gemma 3 270M's) read by greedy rows, 1 to 16 rows per call: the
int8 screen (layers/int8_head.py), the bfloat16 screen (layers/verified_head.py) and the packed
float32 projection, median wall and CPU ms per call.

    PYTHONPATH=service python bench/generation/head_rows.py --threads 1
    PYTHONPATH=service:tests python bench/generation/head_rows.py --threads 1 --real --int4

"int8 choose" times the int8 head's `choose` (the tokens without [rows, V] scores, what an
all-greedy decoding step calls). --real: the real Gemma 3 270M head and final hidden states of
384 teacher-forced greedy steps (8 prompts x 48 tokens, from the embedded GGUF: loading takes
~40 s), instead of a random head and peaked random rows; the rows to rescore per step are
reported too. --int4: what an int4
screen (torch's `_weight_int4pack_mm_for_cpu`, bfloat16 activations and output) would need:
its time per call, and the rows a rigorous bound leaves to rescore (below). --screens int8
times only the int8 screen: run it with each tree's service/ first on PYTHONPATH, alternating,
to compare trees.

The int4 bound, from the CPU kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp, AVX-512):
the weight is dequantized as fma(q - 8, scale, zero) in float32 from bfloat16 scales and zeros
(reproduced here exactly in float64), products are accumulated in float32 along K, the sum is
rounded to bfloat16. So |logit - screened| <= ||h|| ||W_r - deq_r|| (weight rounding) +
||h - bf16(h)|| ||deq_r|| (activation rounding) + 2^-12 ||h|| ||deq_r|| (float32 accumulation)
+ 2^-8 / (1 - 2^-8) |screened| (bfloat16 output), times 1.01.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

VOCAB, DIM = 262144, 640


def _median_ms(fn, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of fn over `inputs`, after one warm-up call each of two."""
    for x in inputs[:2]:
        fn(x)
    wall, cpu = [], []
    for x in inputs:
        w, c = time.perf_counter(), time.process_time()
        fn(x)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return sorted(wall)[len(wall) // 2] * 1e3, sorted(cpu)[len(cpu) // 2] * 1e3


def _no_mask(scores: torch.Tensor) -> None:
    pass


_no_mask.entries = []  # as the engine's min_new_tokens masks list what they mask


def real_head_and_states() -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 3 270M's tied head and the final hidden states of its own greedy continuations."""
    from harness import load_pipeline
    from pipeserve.checkpoints.embedded import embedded_model_dir

    [path] = embedded_model_dir("text-generation").glob("*.gguf")
    pipe = load_pipeline(path, load_in_8bit=False)
    prompts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "Once upon a time, in a small village by the sea, there lived",
               "The three laws of thermodynamics state that", "Ingredients: 2 cups flour, 1 cup sugar,",
               "In 1969, the Apollo 11 mission", "import numpy as np\nimport torch\n\nclass",
               "Q: What is 17 times 23?\nA:"]
    states = []
    try:
        for prompt in prompts:
            [result] = pipe.generate([prompt], {"max_new_tokens": 48, "min_new_tokens": 48})
            ids = torch.tensor([pipe.encode(prompt) + [t.token for t in result.sequences[0].tokens]])
            with torch.no_grad():
                states.append(pipe.model.hidden(ids)[0, -49:-1].clone())
        return pipe.model.verified_head.weight.detach().clone(), torch.cat(states)  # the tied embedding
    finally:
        pipe.close()


def int4_screen(weight: torch.Tensor, group: int):
    """(packed int4, bfloat16 scales and zeros, float32 dequantized weight as the kernel computes
    it): asymmetric per-group min/max quantization."""
    vocab, dim = weight.shape
    grouped = weight.view(vocab, dim // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-30).bfloat16()
    zero = (low + 8 * scale.float()).bfloat16()
    q = ((grouped - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    deq = ((q.double() - 8) * scale.double()[..., None] + zero.double()[..., None]).float().view(vocab, dim)
    scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(vocab, dim).to(torch.int32), 1)
    return packed, scales_and_zeros, deq


def int4_report(weight: torch.Tensor, states: torch.Tensor, group: int) -> dict:
    packed, scales_and_zeros, deq = int4_screen(weight, group)
    rounding = (weight - deq).norm(dim=1)
    deq_norm = deq.norm(dim=1)
    del deq

    def screen(h):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(h.bfloat16(), packed, group, scales_and_zeros)

    one_row = _median_ms(screen, [states[i:i + 1] for i in range(24)])
    counts, held = [], True
    for start in range(0, states.shape[0], 16):
        h = states[start:start + 16]
        low = h.bfloat16()
        screened = screen(h).float()
        h_norm = h.norm(dim=1, keepdim=True)
        spread = 1.01 * (rounding[None] * h_norm + deq_norm[None] * ((h - low.float()).norm(dim=1, keepdim=True)
                                                                     + 2.0 ** -12 * h_norm)
                         + 2.0 ** -8 / (1 - 2.0 ** -8) * screened.abs())
        exact = h.double() @ weight.double().T
        held &= bool(((exact - screened).abs() <= spread).all())
        best = (screened - spread).amax(dim=1, keepdim=True)
        counts.append((screened + spread >= best).sum(dim=1).float())
        del exact
    counts = torch.cat(counts)
    return {"group": group, "1 row ms (wall, CPU)": [round(x, 2) for x in one_row], "bound holds": held,
            "rows to rescore median": int(counts.median()), "p90": int(counts.quantile(0.9)),
            "max": int(counts.max()), "weight rounding norm median": round(float(rounding.median()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real", action="store_true", help="the real Gemma 3 270M head and hidden states")
    parser.add_argument("--int4", action="store_true", help="also report what an int4 screen would need")
    parser.add_argument("--screens", default="int8,bfloat16,float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.real:
        weight, states = real_head_and_states()
    else:
        weight = torch.randn(VOCAB, DIM) * 0.05
        # peaked logits, as a trained model's: each row close to one token's embedding
        states = weight[torch.randint(0, VOCAB, (384,))] * 40 + torch.randn(384, DIM) * 0.2
    screens = args.screens.split(",")
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def exact(h):
        return torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")

    heads = {}
    if "int8" in screens:
        from pipeserve.layers.int8_head import Int8ScreenedHead
        heads["int8 screen"] = Int8ScreenedHead(weight)
    if "bfloat16" in screens:
        from pipeserve.layers.verified_head import VerifiedHead
        heads["bfloat16 screen"] = VerifiedHead(weight)
    import pipeserve
    report = {"tree": pipeserve.__file__, "threads": args.threads, "real": args.real, "rows": {}}
    for rows in (1, 2, 4, 8, 16):
        inputs = [states[i:i + rows] for i in range(0, states.shape[0] - rows + 1, rows)][:24]
        line = {name: _median_ms(lambda h: head.scores(h, _no_mask, exact), inputs) for name, head in heads.items()}
        if hasattr(heads.get("int8 screen"), "choose"):  # the engine's all-greedy steps: tokens only
            line["int8 choose"] = _median_ms(lambda h: heads["int8 screen"].choose(h, _no_mask, exact), inputs)
        if "float32" in screens:
            line["float32"] = _median_ms(exact, inputs)
        if "int8 screen" in heads:
            head = heads["int8 screen"]
            picked = [int((head.scores(h, _no_mask, exact) > -torch.inf).sum()) / rows for h in inputs]
            line["int8 rescored per row (median)"] = sorted(picked)[len(picked) // 2]
        report["rows"][rows] = line
        print(f"{rows:2d} rows: " + ", ".join(
            f"{k} {v[0]:.1f} ms ({v[1]:.1f} CPU ms)" if isinstance(v, tuple) else f"{k} {v}" for k, v in line.items()),
            flush=True)
    if args.int4:
        report["int4"] = [int4_report(weight, states, group) for group in (32, 64, 128)]
        for item in report["int4"]:
            print("int4 screen", item, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
