#!/bin/bash
# Interleaved old/new runs of the existing benches (short settings), 2 rounds each, old then
# new (rounds FIRST..LAST, default 1..2); each run writes its JSON under $OUT/<bench>/<old|new>-<round>/. Args: bench names
# (whisper lone encoders zero_shot image wav2vec2 generation). compare.py reads $OUT.
export HF_HUB_OFFLINE=1
OLD=${OLD:?the old tree, e.g. git worktree add /tmp/old333 333f10a}; NEW=${NEW:-$(cd "$(dirname "$0")/../.." && pwd)}; OUT=${OUT:-/tmp/b14}
PY=${PY:-$NEW/.venv/bin/python}
run() { # tree tag bench round
  local T=$1 tag=$2 b=$3 r=$4; local O=$OUT/$b/$tag-$r; mkdir -p $O
  cd $T; export PYTHONPATH=$T/service:$T/tests:$T/clients/python
  local s=$(date +%s)
  case $b in
    whisper) $PY bench/asr/bench_whisper.py --repeats 1 --max-seconds 60 --threads 2 --runs 1 --only "pipeserve sequential long-form, batch 1, greedy, timestamps" --out $O ;;
    generation) $PY bench/generation/run.py --prompt-tokens 32 --new-tokens 32 --streams 4 --repeats 2 --threads 2 --device cpu --out $O ;;
    encoders) $PY bench/encoders/run.py --texts 64 --batch-size 8 --callers 8 --threads 1 --rounds 2 --out $O ;;
    zero_shot) $PY bench/zero_shot/run.py --size small --texts 8 --batch-size 16 --concurrency 4 --threads 1 --rounds 2 --out $O ;;
    image) $PY bench/image_classification/run.py --size small --images 32 --rounds 2 --out $O ;;
    wav2vec2) $PY bench/asr/bench_wav2vec2.py --seconds 20 --threads 2 --runs 1 --out $O/results.json ;;
    lone) $PY bench/lone_call/run.py --calls 100 --out $O/results.json ;;
  esac > $O/stdout 2> $O/stderr
  echo "$b $tag $r rc=$? $(( $(date +%s)-s ))s" >> $OUT/log
}
for b in "$@"; do for r in $(seq ${FIRST:-1} ${LAST:-2}); do run $OLD old $b $r; run $NEW new $b $r; done; done
