#!/bin/bash
# wav2vec2: the bench's own engine children (warm-up on 2 s, one timed run of the whole audio),
# every engine on the old and the new tree in turn, N rounds; the same checkpoint and audio.
# Args: WORK (a bench-w2v work dir holding ckpt/ and audio.f32), rounds N.
# Results in $OUT/wav2vec2_engines/<old|new>-<round>/results.json, in the bench's own shape.
export HF_HUB_OFFLINE=1
WORK=$1; N=${2:-3}
OLD=${OLD:?the old tree}; NEW=${NEW:-$(cd "$(dirname "$0")/../.." && pwd)}; OUT=${OUT:-/tmp/b14}; PY=${PY:-$NEW/.venv/bin/python}
for r in $(seq 1 $N); do for pair in old:$OLD new:$NEW; do
  tag=${pair%%:*}; T=${pair#*:}; O=$OUT/wav2vec2_engines/$tag-$r; mkdir -p $O; cd $T
  for engine in transformers pipeserve pipeserve-grpc; do
    PYTHONPATH=$T/service:$T/tests:$T/clients/python $PY bench/asr/bench_wav2vec2.py --engine $engine \
      --checkpoint $WORK/ckpt --audio $WORK/audio.f32 --chunk 10 --threads 2 --batch-size 1 2> $O/$engine.err | tail -1 > $O/$engine.out
  done
  python3 -c "import json,sys; print(json.dumps({'engines': [json.load(open('$O/' + e + '.out')) for e in ('transformers', 'pipeserve', 'pipeserve-grpc')]}))" > $O/results.json
  echo "wav2vec2_engines $tag $r $(python3 -c "import json; print([(e['engine'], round(e['seconds'], 2)) for e in json.load(open('$O/results.json'))['engines']])")" >> $OUT/log
done; done
