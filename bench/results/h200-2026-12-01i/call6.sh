# Call 6: call 5 again (same warm machine), the kernels_b lane stopped with SIGABRT at 150 s so that Python's
# faulthandler (-X faulthandler) prints every thread's stack: where the stalled test waits.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=/tmp/site
mkdir -p $OUT/t
PT="python -X faulthandler -m pytest -m gpu -p no:cacheprovider -rfEs --tb=short"
(timeout 200 python bench/gpu/quality_pipeline.py --stages train --deadline 190 --train-args "--steps 360 --time-budget 115" --work /tmp/pdq-q6 --out $OUT/q > $OUT/q_stdout.log 2>&1; echo "train rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 200 $PT -q tests/test_kernels_fast_gpu.py -k "sweep or untuned or forced" > $OUT/t/kernels_a.log 2>&1; echo "kernels_a rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 200 $PT -q tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_distill_ce.py > $OUT/t/pack.log 2>&1; echo "pack rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout -s ABRT 150 $PT -v tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log; nvidia-smi >> $OUT/t/kernels_b.log 2>&1) &
sleep 140; nvidia-smi > $OUT/t/smi_140s.txt 2>&1; ps aux --sort=-%cpu | head -15 >> $OUT/t/smi_140s.txt
wait
cat $OUT/lanes.log
grep -h "PASSED\|FAILED" $OUT/t/kernels_b.log | tail -3
grep -n -A25 "Fatal Python\|Current thread\|Thread 0x" $OUT/t/kernels_b.log | head -120
