# Call 4: a fresh 600-step teacher (bench.train's default) through recipe (c) at lr 2e-4 and 3e-4 side by side, phase
# 2 from the lr 3e-4 run, W4A16; every row scored by the fixed harness (as the thirty-first session's call 7).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=/tmp/site
mkdir -p $OUT/q; rm -rf /tmp/pdq-quality
timeout 565 python bench/gpu/quality_pipeline.py --stages train,eval,prune,distill,final --criteria taylor+refit+train --distill-from taylor+refit+train --token-budget-pct 5 --parallel 2 --distill1-variants "hw10-ce0.2-lr2e-4=--hidden-weight 10 --ce-weight 0.2 --lr 2e-4;hw10-ce0.2-lr3e-4=--hidden-weight 10 --ce-weight 0.2 --lr 3e-4" --distill2-from hw10-ce0.2-lr3e-4 --distill2-args "--lr 2e-5" --overlap-ngrams 8 --out $OUT/q --deadline 550 > $OUT/q/stdout.log 2>&1; echo "end ${SECONDS}s rc=$?" >> $OUT/q/stdout.log; tail -n 32 $OUT/q/stdout.log
