# Call 5 (the same lease as call 4, its checkpoints in /tmp/c4): call 4's two distill runs again with
# --grad-ckpt --chunk 1024 (distill_bench.py's E4B configuration "1,8,2048,1,1024"; without them both ran out of
# the H200's memory in the loss), then the sha256 of each run's weights files.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PDQKIT_CACHE=/tmp/c4/cache W=/tmp/c4
mkdir -p $OUT
for run in A B; do
  S=$SECONDS
  timeout 170 python -m distill --teacher $W/t --student $W/s -o $W/o$run --data $W/data.jsonl --steps 3 --batch 8 \
    --seq-len 2048 --precision bf16-master --attn pdq_hybrid --loss-impl fused --compile-loss --compile-layers \
    --ckpt-layers 28 --grad-ckpt --chunk 1024 --deterministic --log-json $OUT/run$run.jsonl > $OUT/run$run.log 2>&1
  echo "run$run rc $? $((SECONDS-S))s" >> $OUT/times.txt
  (cd $W/o$run && sha256sum *.safetensors > $OUT/run$run.sha256)
  rm -rf $W/o$run
done
cat $OUT/times.txt; tail -n 4 $OUT/runA.log $OUT/runB.log; cat $OUT/run*.sha256
cmp -s $OUT/runA.sha256 $OUT/runB.sha256 && echo SAME || echo DIFFER
