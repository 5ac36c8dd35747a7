# Call A (thirty-fifth session; the two-H200 kind was not lent: one H200, so the two-GPU test is not run): the GPU
# tests of this session's review fixes that need no vLLM:
# every kernel GPU test (the dispatcher's device guard, the sm_80 gate of the MMA GEMVs, round_to's NaN), the new
# two-GPU test (operands on the non-current GPU), and the pack / distill GPU tests (durable output, one config
# read, packing strides; CPU vs CUDA bytes). Six lanes on the one GPU.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=3"
F=tests/test_kernels_fast_gpu.py
lane() { local name=$1 gpus=$2; shift 2; (CUDA_VISIBLE_DEVICES=$gpus timeout 420 $PT "$@" > $OUT/t/$name.log 2>&1; echo "$name rc $? ${SECONDS}s" >> $OUT/lanes.log) & }
lane a 0 $F -k "sweep or untuned or forced"
lane b1 0 $F -k "gemv_mma8 or gemv_offset or bias_channelwise"
lane b2 0 $F -k "prefill_wsp_and_split_k or k_halves"
lane b3 0 $F -k "stream_k or prefill_tma or gemv_mma_chain"
lane b4 0 $F -k "deterministic or cuda_graph or op_and_torch_compile or hf_generation"
lane pack 0 tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_toolrun.py tests/test_distill_ce.py tests/test_distill_parallel_device.py
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
grep -h -E "^(FAILED|ERROR|SKIPPED)" $OUT/t/*.log | head -20
