# Call 4 (a fresh machine): `python -m distill --deterministic` at E4B shape, every speed switch, twice (are the
# written weights the same bytes?), and the cost of the model hashes a training-checkpoint run takes at its start
# (distill.train.checkpoint_sha256: cold, then through pack's input-hash cache).
# SCALE=micro EXTRA="--device cpu" runs the same steps on the CPU (a smoke run of this script).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
SCALE=${SCALE:-e4b}; MLP=${MLP:-8192}; STEPS=${STEPS:-3}; BATCH=${BATCH:-8}; SEQ=${SEQ:-2048}; W=${W:-/tmp/c4}
SW=${SW:---precision bf16-master --attn pdq_hybrid --loss-impl fused --compile-loss --compile-layers --ckpt-layers 28}
EXTRA=${EXTRA:-}
export PDQKIT_CACHE=$W/cache
mkdir -p $W $OUT
T=$OUT/times.txt
S=$SECONDS
timeout 200 python - > $OUT/gen.log 2>&1 <<PY
import json, random, time
from bench.factory import save_random_checkpoint_streamed as s, text_config
t = time.perf_counter()
s("$SCALE", "$W/t", seed=0, force=True)
s("$SCALE", "$W/s", seed=1, force=True, intermediate_size=$MLP)
v = text_config("$SCALE").vocab_size
r = random.Random(0)
with open("$W/data.jsonl", "w") as f:
    for _ in range(4 * $BATCH):
        f.write(json.dumps({"input_ids": [r.randrange(v) for _ in range($SEQ)]}) + "\n")
print(f"generated in {time.perf_counter() - t:.1f} s, vocab {v}")
PY
echo "gen rc $? $((SECONDS-S))s $(du -sh $W/t | cut -f1) $(du -sh $W/s | cut -f1)" >> $T
S=$SECONDS
timeout 60 python - > $OUT/hash.log 2>&1 <<PY
import time
from distill.train import checkpoint_sha256
for name in ("t", "s", "t", "s"):
    t = time.perf_counter(); h = checkpoint_sha256("$W/" + name)
    print(f"checkpoint_sha256 {name} {time.perf_counter() - t:.2f} s {h}")
PY
echo "hash rc $? $((SECONDS-S))s" >> $T
for run in A B; do
  S=$SECONDS
  timeout ${RUN_TIMEOUT:-165} python -m distill --teacher $W/t --student $W/s -o $W/o$run --data $W/data.jsonl \
    --steps $STEPS --batch $BATCH --seq-len $SEQ $SW --deterministic --log-json $OUT/run$run.jsonl $EXTRA \
    > $OUT/run$run.log 2>&1
  echo "run$run rc $? $((SECONDS-S))s" >> $T
  (cd $W/o$run && sha256sum *.safetensors > $OUT/run$run.sha256 2>&1)
  rm -rf $W/o$run
done
cat $T; cat $OUT/hash.log; tail -n 4 $OUT/runA.log $OUT/runB.log; cat $OUT/run*.sha256
cmp -s $OUT/runA.sha256 $OUT/runB.sha256 && echo "A and B: the same weights" || echo "A and B: weights DIFFER"
