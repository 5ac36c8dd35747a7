# Forty-second session, call 1 (a fresh machine, carry .wheelhouse/part1): the GPU tests of the stages this session
# changed (distill's hardware record and attention choice, prune's device record and its new CUDA-vs-CPU test),
# with the pack tests beside them. Kernels are unchanged since the forty-first session's whole-suite run.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> $OUT/device.txt
bash .wheelhouse/part1/install-wheelhouse.sh > $OUT/install1.log 2>&1; echo "install1 rc $?"
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rA --tb=short --durations=8"
L=500
(timeout $L $PT tests/test_prune.py > $OUT/t/prune.log 2>&1; echo "prune rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py tests/test_distill_run.py > $OUT/t/pack_distill.log 2>&1; echo "pack_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
grep -h "cuda vs cpu" $OUT/t/prune.log
