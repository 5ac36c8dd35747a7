# Call 1 (thirty-fifth session): the whole GPU suite that needs no vLLM on the current head (the fourth-round fixes
# after 9f1086e ran on the CPU only), beside training the bed's 360-step `small` (eval, W4A16) for call 3's
# graph-mode token check.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log -1 --oneline 2>/dev/null
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 330 python bench/gpu/quality_pipeline.py --stages train,eval,quant --deadline 320 --train-args "--steps 360 --time-budget 115" --out $OUT/q > $OUT/q_stdout.log 2>&1; echo "quality rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 520 $PT tests/test_kernels_fast_gpu.py -k "sweep or untuned or forced" > $OUT/t/kernels_a.log 2>&1; echo "kernels_a rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 560 $PT -v tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 520 $PT tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py > $OUT/t/pack_distill.log 2>&1; echo "pack_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
grep -E "PASSED|FAILED|ERROR" $OUT/t/kernels_b.log | tail -3
tail -8 $OUT/q_stdout.log
ls /tmp/pdq-quality
