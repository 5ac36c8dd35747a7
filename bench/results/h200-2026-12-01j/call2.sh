# Call 2: phase 2 on the GPU with the float64 Gumbel sampler and the continuation-only lm_head count in its MFU
# (small and E4B-shaped pairs, random weights), then the GEMV/split-K heuristics on the `small` shapes with the
# rotation fix (copies >= 3x L2).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
bash .wheelhouse/part2/install-wheelhouse.sh > /tmp/install2.log 2>&1; echo "install2 rc $?"
export PYTHONPATH=/tmp/site
mkdir -p $OUT/d $OUT/h
timeout 300 python bench/gpu/distill_bench.py --pairs small --configs "2,32,256,0,4096" --steps 3 --warmup 1 --out $OUT/d --json-name small_p2.json > $OUT/d/small_p2.log 2>&1; echo "small p2 rc $? ${SECONDS}s"
timeout 200 python bench/gpu/distill_bench.py --pairs e4b --configs "2,4,512,1,1024" --steps 2 --warmup 1 --out $OUT/d --json-name e4b_p2.json > $OUT/d/e4b_p2.log 2>&1; echo "e4b p2 rc $? ${SECONDS}s"
tail -6 $OUT/d/small_p2.log; tail -6 $OUT/d/e4b_p2.log
timeout $((560 - SECONDS)) python bench/gpu/heuristic_check.py --ms 1 2 4 8 16 > $OUT/h/heuristic.log 2>&1; echo "heur rc $? ${SECONDS}s"
grep -E "^(768|512|1536|5120)x" $OUT/h/heuristic.log | head -40; tail -1 $OUT/h/heuristic.log
