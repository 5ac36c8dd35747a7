# Call 5 (a second lease): call 1's kernels_b lane stopped at its 15th test (test_prefill_wsp_stream_k_against_reference
# [dtype1]) until its 400 s timeout, beside a training run and two other test lanes; call 3 ran the same lane alone in
# 32 s. Here: call 1's load again (train + kernels_a + pack tests), beside it the kernels_b lane, then the stream-K
# test alone in a loop, each with a 120 s limit and py-spy-free evidence: faulthandler dumps every 60 s.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
export PYTHONPATH=/tmp/site
PT="python -X faulthandler -m pytest -m gpu -p no:cacheprovider -rfEs --tb=short -o faulthandler_timeout=60"
(timeout 330 python bench/gpu/quality_pipeline.py --stages train --deadline 320 --train-args "--steps 360 --time-budget 115" --out $OUT/q > $OUT/q_stdout.log 2>&1; echo "train rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 300 $PT -q tests/test_kernels_fast_gpu.py -k "sweep or untuned or forced" > $OUT/t/kernels_a.log 2>&1; echo "kernels_a rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 300 $PT -q tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_distill_ce.py > $OUT/t/pack.log 2>&1; echo "pack rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 200 $PT -v tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log
 for i in 1 2 3 4 5 6 7 8; do
   [ $SECONDS -gt 440 ] && break
   timeout 120 $PT -v tests/test_kernels_fast_gpu.py -k "stream_k" > $OUT/t/streamk_$i.log 2>&1; echo "streamk $i rc $? ${SECONDS}s" >> $OUT/lanes.log
 done) &
wait
cat $OUT/lanes.log
grep -h "PASSED\|FAILED\|Timeout\|File \"" $OUT/t/kernels_b.log | head -40
for f in $OUT/t/streamk_*.log; do echo "$f: $(grep -c PASSED $f) passed; $(grep -c 'Timeout' $f) timeout dumps"; done
tar -C $OUT -cJf $OUT/t_logs.tar.xz t && rm -rf $OUT/t
