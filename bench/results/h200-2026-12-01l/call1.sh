# Call 1 (thirty-sixth session): split-K for the GEMVs. The new GPU tests (split GEMVs against the reference,
# repeatability, CUDA graphs, counters back at zero; forced GEMV variants with split 3) beside a GEMV sweep with
# split-K on the four E4B decode shapes, M = 1..16, against the tuned table.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t $OUT/s
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 300 $PT tests/test_kernels_fast_gpu.py -k "split_k_against or forced" > $OUT/t/split_tests.log 2>&1; echo "tests rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 540 python bench/gpu/gemv_sweep.py --out $OUT/s --shapes 2560x8192 16384x2560 3072x2560 2560x2048 --ms 1 2 4 8 16 --kernels gemv_mma gemv_mma8 --bns 2 4 8 16 32 --bks 512 1024 2048 --warps 1 2 4 --splits 1 2 3 4 6 8 --jobs 15 --name split_sweep.json > $OUT/s/sweep.log 2>&1; echo "sweep rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
tail -3 $OUT/t/split_tests.log
grep -E "tuned|^ +[0-9]" $OUT/s/sweep.log | head -150
