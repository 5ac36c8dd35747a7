# Call 5: the GEMV GPU tests not run yet on the split-K code (per-word / chained / full-MMA GEMVs against the
# reference, offset activations, bias / channelwise / 3-D input, the op under torch.compile), and the sanitizers
# on the two new split-K GEMV demo launches (13, 14) and a plain one (11) beside them.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t $OUT/san
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=3"
(timeout 400 $PT tests/test_kernels_fast_gpu.py -k "gemv_mma8_against or chain_against or gemv_offset or bias_channelwise or op_and_torch_compile" > $OUT/t/gemv_tests.log 2>&1; echo "tests rc $? ${SECONDS}s" >> $OUT/lanes.log) &
for i in 11 13 14; do (timeout 300 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 200 --show-backtrace no python -m kernels.w4a16_autotune --demo --demo-only $i > $OUT/san/racecheck_$i.log 2>&1; echo "racecheck $i rc $? ${SECONDS}s" >> $OUT/lanes.log) & done
(timeout 300 compute-sanitizer --tool memcheck python -m kernels.w4a16_autotune --demo --demo-only 13,14 > $OUT/san/memcheck.log 2>&1; echo "memcheck rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 300 compute-sanitizer --tool synccheck python -m kernels.w4a16_autotune --demo --demo-only 13,14 > $OUT/san/synccheck.log 2>&1; echo "synccheck rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
tail -2 $OUT/t/gemv_tests.log
for f in $OUT/san/*.log; do echo "== $f"; grep -E "^demo|ERROR SUMMARY|RACECHECK SUMMARY|hazard" $f | head -6; done
