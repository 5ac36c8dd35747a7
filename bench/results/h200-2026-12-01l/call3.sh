# Call 3: vLLM 0.26.0 (wheelhouse part 3). The kernel benchmark with Marlin and Machete beside pdqkit on the table
# with the two split-K GEMV entries (2560x8192 at M = 4 and 8; the call 2 autotune's other changes were within the
# noise in its A/B and were not kept), then the vLLM plugin's GPU tests.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
bash .wheelhouse/part3/install-wheelhouse.sh > /tmp/install3.log 2>&1; echo "install3 rc $?"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p $OUT/kern $OUT/t
timeout 240 python -m bench.bench_kernels --out $OUT/kern > $OUT/kern/bench_stdout.txt 2>&1; echo "bench rc $? ${SECONDS}s"
tail -12 $OUT/kern/bench_stdout.txt
grep -E "^ *(qkv|o|gate_up|down) .* (1|2|4|8|16) \|" $OUT/kern/bench_kernels.txt
timeout 300 python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short tests/test_vllm_plugin.py tests/test_marlin_exact_gpu.py > $OUT/t/vllm_tests.log 2>&1; echo "vllm tests rc $? ${SECONDS}s"
tail -2 $OUT/t/vllm_tests.log
