# Call 1 (thirty-fourth session): train the bed's 360-step `small` (eval with the fixed harness, W4A16), beside the
# GPU tests of the changed code that need no vLLM (kernels: census, table override, counter pools; pack; distill).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 330 python bench/gpu/quality_pipeline.py --stages train,eval,quant --deadline 320 --train-args "--steps 360 --time-budget 115" --out $OUT/q > $OUT/q_stdout.log 2>&1; echo "quality rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 400 $PT tests/test_kernels_fast_gpu.py -k "sweep or untuned or forced" > $OUT/t/kernels_a.log 2>&1; echo "kernels_a rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 400 $PT tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 400 $PT tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py tests/test_bench_eval.py > $OUT/t/pack_distill.log 2>&1; echo "pack_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
tail -8 $OUT/q_stdout.log
ls /tmp/pdq-quality
