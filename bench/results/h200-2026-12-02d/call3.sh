# Call 3 (after part2's install in call 2, carry .wheelhouse/part3): the GPU suite's files that need vLLM, and the
# HF generation test; call 1's fourth lane again (its Triton cache warm on this machine)
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part3/install-wheelhouse.sh > $OUT/install3.log 2>&1; echo "install3 rc $?"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
python -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 440 $PT tests/test_marlin_exact_gpu.py > $OUT/t/marlin_exact.log 2>&1; echo "marlin_exact rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 440 $PT tests/test_vllm_plugin.py > $OUT/t/vllm_plugin.log 2>&1; echo "vllm_plugin rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 440 $PT tests/test_kernels_fast_gpu.py -k "hf_generation" > $OUT/t/kernels_hf.log 2>&1; echo "kernels_hf rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 440 $PT tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_rest2.log 2>&1; echo "kernels_rest2 rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
