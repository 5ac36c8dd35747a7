# Call 1 (thirty-third session): the red_bar fix on the H200 -- A/B timing against the unfixed kernel, the
# prefill_wsp GPU tests, and racecheck (one process per demo launch) + synccheck over every demo launch.
# Runs from the repo root of the device copy (the fix applied in the working tree); $OUT comes back.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/r /tmp/old
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
# the unfixed kernel: a copy of the tree with the fix reversed
tar --exclude=.wheelhouse -cf - . | tar -C /tmp/old -xf -
(cd /tmp/old && patch -R -p1 < bench/results/h200-2026-12-01h/red_bar_fix.patch) || echo "REVERSE PATCH FAILED"
grep -c "red, red_bar = ready, ready" kernels/w4a16_prefill_wsp.py /tmp/old/kernels/w4a16_prefill_wsp.py
# 1. A/B timing on a quiet GPU: the BN=128 tiled configs (the only ones the fix touches), new/old/new/old
AB="--configs 256,128,128,3 128,128,128,4 128,128,128,4,3 --tma 128,64,128,4 --ms 256 512 1024 --shapes 16384x2560 8192x8192 3072x2560"
for r in 1 2; do
  echo "=== round $r new"; timeout 150 python bench/gpu/prefill_wsp_check.py $AB 2>&1
  echo "=== round $r old"; (cd /tmp/old && timeout 150 python bench/gpu/prefill_wsp_check.py $AB 2>&1)
done > $OUT/ab.log; echo "ab done ${SECONDS}s"
# 2. beside each other: the prefill_wsp GPU tests, synccheck, racecheck per launch (no host backtraces)
(timeout 400 python -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/test_kernels_fast_gpu.py -k "wsp or prefill" > $OUT/wsp_tests.log 2>&1; echo "tests rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 400 compute-sanitizer --tool synccheck --show-backtrace no python -m kernels.w4a16_autotune --demo > $OUT/r/synccheck.log 2>&1; echo "synccheck rc $? ${SECONDS}s" >> $OUT/lanes.log) &
for i in $(seq 0 14); do
  (timeout 420 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 2000 --show-backtrace no python -m kernels.w4a16_autotune --demo --demo-only $i > $OUT/r/racecheck_$i.log 2>&1; echo "racecheck $i rc $? ${SECONDS}s" >> $OUT/lanes.log) &
done
wait
cat $OUT/lanes.log
tail -3 $OUT/wsp_tests.log
for f in $OUT/r/synccheck.log $OUT/r/racecheck_*.log; do echo "$f: $(grep -h '^demo' $f | tr '\n' ' ') | $(grep -h 'SUMMARY' $f)"; done | sed "s#$OUT/r/##" | tee $OUT/sanitizer_summary.txt
tar -C $OUT -cJf $OUT/sanitizer_logs.tar.xz r && rm -rf $OUT/r
grep -h "^check\|geomean\|µs" $OUT/ab.log | grep -c FAIL
ls -la $OUT
