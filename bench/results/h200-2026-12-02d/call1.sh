# Forty-third session, call 1 (a fresh machine, carry .wheelhouse/part1): the GPU suite's files that need no vLLM,
# in four lanes (compressed-tensors from part1 for the HF and pack tests); prune's GPU test in the fourth.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> $OUT/device.txt
bash .wheelhouse/part1/install-wheelhouse.sh > $OUT/install1.log 2>&1; echo "install1 rc $?"
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=8"
L=520
(timeout $L $PT tests/test_kernels_fast_gpu.py -k "sweep or untuned" > $OUT/t/kernels_sweep.log 2>&1; echo "kernels_sweep rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_kernels_fast_gpu.py -k "forced" > $OUT/t/kernels_forced.log 2>&1; echo "kernels_forced rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_rest.log 2>&1; echo "kernels_rest rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py tests/test_distill_run.py tests/test_prune.py > $OUT/t/pack_distill.log 2>&1; echo "pack_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
