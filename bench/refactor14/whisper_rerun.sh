#!/bin/bash
# Whisper greedy: the bench's own engine child (warm-up, then --runs timed runs in one process),
# old and new trees alternately, N rounds; same audio/work dir. Results in $OUT/whisper_greedy/.
export HF_HUB_OFFLINE=1
# Args: WORK (a bench_whisper work dir holding audio.f32), rounds N, timed runs per process.
WORK=$1; N=${2:-4}; RUNS=${3:-3}
OLD=${OLD:?the old tree}; NEW=${NEW:-$(cd "$(dirname "$0")/../.." && pwd)}; OUT=${OUT:-/tmp/b14}; PY=${PY:-$NEW/.venv/bin/python}
for r in $(seq 1 $N); do for pair in old:$OLD new:$NEW; do
  tag=${pair%%:*}; T=${pair#*:}; O=$OUT/whisper_greedy/$tag-$r; mkdir -p $O; cd $T
  PYTHONPATH=$T/service:$T/tests:$T/clients/python $PY bench/asr/bench_whisper.py --engine pipeserve --options '{}' \
    --work $WORK --threads 2 --runs $RUNS > $O/stdout 2> $O/stderr
  tail -1 $O/stdout > $O/result.json
  echo "whisper_greedy $tag $r $(python3 -c "import json,sys; d=json.load(open('$O/result.json')); print(['%.2f' % x for x in d['all_seconds']])")" >> $OUT/log
done; done
