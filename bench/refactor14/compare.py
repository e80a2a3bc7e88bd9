"""New/old ratios from interleaved runs of the existing benches on two trees (drive.sh): every
timing leaf of each bench's JSON (a time or a rate), each tree's best over its runs, and the
ratio as new time / old time (>1: the new tree is slower). Reference rows (transformers) run
in the same processes on both trees, so their ratio shows the run's noise. Also checks the
outputs the benches record (texts, output differences against transformers) are equal.

    python bench/refactor14/compare.py /tmp/b14 bench/refactor14/results/results.json > bench/refactor14/results/results.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TIME_KEYS = {"seconds", "p50_total_ms", "p50_compute_ms", "ttft_s", "ttft_ms", "seconds_per_run"}
RATE_SUFFIXES = ("_per_s", "tokens_per_s", "tok_s")
OUTPUT_WORDS = ("text", "same", "equal", "diff", "match", "wer", "in_process", "grpc", "tokens")
REFERENCE_ROWS = ("transformers", "reference")  # generation's rows are reference_* / ours_*
SKIP = {"environment", "all_seconds", "every_round_seconds", "options"}


def leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in SKIP:
                yield from leaves(value, path + (str(key),))
    elif isinstance(node, list):
        key = next((k for k in ("name", "engine") if all(isinstance(x, dict) and k in x for x in node)), None)
        for i, value in enumerate(node):
            yield from leaves(value, path + ((value[key] if key else str(i)),))
    else:
        yield path, node


def kind(path) -> str | None:
    key = path[-1]
    if key in TIME_KEYS:
        return "time"
    if key.endswith(RATE_SUFFIXES):
        return "rate"
    return None


def runs(bench_dir: Path, tree: str) -> list[dict]:
    found = []
    for d in sorted(bench_dir.glob(f"{tree}-*")):
        files = [f for f in d.glob("*.json")]
        if files:
            found.append(json.loads(files[0].read_text()))
    return found


def normalized(result: dict) -> dict[tuple, float]:
    """Each pipeserve time leaf over the first transformers row's time under the same parent in
    the same run: the machine's load at that moment divides out."""
    times = [(p, float(v) if kind(p) == "time" else 1 / float(v)) for p, v in leaves(result)
             if kind(p) and isinstance(v, (int, float)) and not isinstance(v, bool) and v and len(p) >= 2]
    out = {}
    for path, value in times:
        if path[-2].startswith(REFERENCE_ROWS):
            continue
        refs = [v for p, v in times if p[:-2] == path[:-2] and p[-2].startswith(REFERENCE_ROWS) and p[-1] == path[-1]]
        if refs:
            out[path] = value / refs[0]
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def best(values: list[float], how: str) -> float:
    return min(values) if how == "time" else max(values)


def compare(bench_dir: Path) -> tuple[list[tuple], list[str]]:
    old, new = runs(bench_dir, "old"), runs(bench_dir, "new")
    rows, output_notes = [], []
    if not old and not new:
        return rows, []  # not a bench's folder
    if not old or not new:
        return rows, [f"missing runs (old {len(old)}, new {len(new)})"]
    series: dict[tuple, dict[str, list]] = {}
    norm: dict[tuple, dict[str, list]] = {}
    for tree, results in (("old", old), ("new", new)):
        for result in results:
            for path, value in normalized(result).items():
                norm.setdefault(path, {"old": [], "new": []})[tree].append(value)
    for tree, results in (("old", old), ("new", new)):
        for result in results:
            for path, value in leaves(result):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and kind(path):
                    series.setdefault(path, {"old": [], "new": []})[tree].append(float(value))
                elif "limit" in path[-1]:
                    continue  # a measured bound (memory bandwidth), not an output
                elif any(w in path[-1] for w in OUTPUT_WORDS) or any("diff" in p or "match" in p for p in path):
                    series.setdefault(("output",) + path, {"old": [], "new": []})[tree].append(value)
    for path, sides in series.items():
        if path[0] == "output":
            values = sides["old"] + sides["new"]
            if path[-1] == "wer" or isinstance(values[0], str):
                same = len({json.dumps(v) for v in values}) == 1
            else:
                same = max(values) - min(values) <= 1e-6
            output_notes.append(f"{' / '.join(path[1:])}: {'equal' if same else 'DIFFERENT'} on every run"
                                if same else f"{' / '.join(path[1:])}: old {sides['old']} new {sides['new']}")
            continue
        how = kind(path)
        if not sides["old"] or not sides["new"]:
            continue
        o, n = best(sides["old"], how), best(sides["new"], how)
        ratio = n / o if how == "time" else o / n
        if how == "rate" and any(p[:-1] == path[:-1] and p[-1] == "seconds" for p in series):
            continue  # the same row's time says it already
        against = norm.get(path)
        against_ratio = geomean(against["new"]) / geomean(against["old"]) if against and against["old"] and against["new"] else None
        rows.append((" / ".join(path[:-1]), path[-1], o, n, ratio, against_ratio, len(sides["old"]), len(sides["new"])))
    return rows, output_notes


def main() -> None:
    root = Path(sys.argv[1])
    for tree in ("old", "new"):
        env = next((r["environment"] for d in sorted(root.iterdir()) if d.is_dir() for r in runs(d, tree)
                    if isinstance(r.get("environment"), dict)), {})
        print(f"{tree}: pipeserve {env.get('pipeserve_commit')}, CPU {env.get('cpu_model')} "
              f"({env.get('cpu_family_model_stepping')}, {env.get('cpu_count')} cores), torch {env.get('torch')}, "
              f"load average at a start {env.get('load_average_at_start')}\n")
    print("| bench | row | metric | old best | new best | new/old time | new/old, each run over its transformers row | runs old/new |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    notes, table = [], []
    for bench_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        rows, output_notes = compare(bench_dir)
        for row, metric, o, n, ratio, against, no, nn in rows:
            table.append({"bench": bench_dir.name, "row": row, "metric": metric, "old_best": o, "new_best": n,
                          "new_over_old_time": ratio, "new_over_old_against_transformers": against,
                          "runs_old": no, "runs_new": nn})
            shown = f"{against:.3f}" if against is not None else "–"
            print(f"| {bench_dir.name} | {row} | {metric} | {o:.4g} | {n:.4g} | {ratio:.3f} | {shown} | {no}/{nn} |")
        notes += [f"- {bench_dir.name}: {note}" for note in output_notes]
    print("\nOutputs:\n" + "\n".join(notes))
    if len(sys.argv) > 2:
        every_run = {d.name: {tree: runs(d, tree) for tree in ("old", "new")} for d in sorted(root.iterdir()) if d.is_dir()}
        Path(sys.argv[2]).write_text(json.dumps({"ratios": table, "outputs": notes, "runs": every_run}, indent=1) + "\n")


if __name__ == "__main__":
    main()
