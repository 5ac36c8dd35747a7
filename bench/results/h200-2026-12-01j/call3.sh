# Call 3: vLLM 0.26.0 (wheelhouse part3). `fast` against Marlin under CUDA graphs (vLLM's default graph mode) on
# call 1's trained `small` W4A16, with the launch census; beside it the vLLM GPU tests.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
bash .wheelhouse/part3/install-wheelhouse.sh > /tmp/install3.log 2>&1; echo "install3 rc $?"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p $OUT/t $OUT/graph
CK=/tmp/pdq-quality/base-w4a16
(timeout 540 python bench/gpu/vllm_e2e_check.py --ckpt $CK --kernels fast --modes graph --prompts 8 --text-prompts --new-tokens 32 --parallel 3 --timeout 480 --work /tmp/e2e-graph --out $OUT/graph > $OUT/graph/check.log 2>&1; echo "graph rc $? ${SECONDS}s" >> $OUT/lanes.log) &
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 450 $PT tests/test_vllm_plugin.py tests/test_marlin_exact_gpu.py > $OUT/t/vllm_tests.log 2>&1; echo "vllm_tests rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
tail -1 $OUT/t/vllm_tests.log
grep -E "^launches|^fast|^gates|^engine|^default|^marlin|^fast-" $OUT/graph/check.log
tail -5 $OUT/graph/check.log
xz -9 $OUT/graph/vllm_e2e_check_logs.txt 2>/dev/null; ls $OUT/graph
