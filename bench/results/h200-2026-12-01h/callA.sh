# Lease 2, call A (thirty-third session): racecheck on the control kernels, and the GPU suite's files that need
# no vLLM, in three lanes beside each other (wheelhouse part1: compressed-tensors for the HF test).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/c $OUT/t
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 500 $PT tests/test_kernels_fast_gpu.py -k "sweep or untuned or forced" > $OUT/t/kernels_a.log 2>&1; echo "kernels_a rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 500 $PT tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 500 $PT tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py > $OUT/t/pack_distill.log 2>&1; echo "pack_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
# the controls: plain run (correctness), then racecheck one process per control, then synccheck
(python bench/gpu/racecheck_controls.py > $OUT/c/plain.log 2>&1; echo "plain rc $?" >> $OUT/c/plain.log
 for c in capture handoff handoff_cta; do
   timeout 200 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 100000 --show-backtrace no python bench/gpu/racecheck_controls.py --only $c > $OUT/c/racecheck_$c.log 2>&1; echo "racecheck $c rc $?" >> $OUT/c/racecheck_$c.log
 done
 timeout 200 compute-sanitizer --tool synccheck --show-backtrace no python bench/gpu/racecheck_controls.py > $OUT/c/synccheck.log 2>&1
 echo "controls done ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log $OUT/c/plain.log
for f in $OUT/c/racecheck_*.log $OUT/c/synccheck.log; do echo "$(basename $f): $(grep -h '^control' $f | tr '\n' ' ') | $(grep -h 'SUMMARY' $f)"; grep -h "Potential\|Thread (" $f | sed -E 's/0x[0-9a-f]+ in block \([0-9,]+\)/ADDR/; s/Thread \([0-9,]+\)/Thread T/' | sort | uniq -c | sort -rn | head -6; done | tee $OUT/controls_summary.txt
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
tar -C $OUT -cJf $OUT/controls_logs.tar.xz c && rm -rf $OUT/c
ls -la $OUT $OUT/t
