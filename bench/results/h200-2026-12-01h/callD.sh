# Lease 2, call D: racecheck on the capture control shaped like prefill_wsp's partitions
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT/c
python bench/gpu/racecheck_controls.py --only capture3,capture 2>&1
for c in capture3; do
  timeout 150 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 100000 --show-backtrace no python bench/gpu/racecheck_controls.py --only $c > $OUT/c/racecheck_$c.log 2>&1; echo "racecheck $c rc $?"
  grep -h "^control\|SUMMARY" $OUT/c/racecheck_$c.log
  grep -h "Potential\|Thread (" $OUT/c/racecheck_$c.log | sed -E 's/0x[0-9a-f]+ in block \([0-9,]+\)/ADDR/; s/Thread \([0-9,]+\)/Thread T/' | sort | uniq -c | sort -rn | head -8
done
xz $OUT/c/*.log
