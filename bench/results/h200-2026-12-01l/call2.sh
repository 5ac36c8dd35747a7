# Call 2: the autotuner with the GEMVs' split-K (candidates of gemv_mma / gemv_mma8 with their split values, the
# table's own entry timed beside and kept unless beaten) on the six E4B shapes, M = 1..16, merged into a copy of
# the table; then the A/B of the new table against the old one and the GPU tests that run the tuned table.
# Beside it, the wheelhouse's part 1 is installed for the vLLM calls that follow.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/a $OUT/t
(bash .wheelhouse/part1/install-wheelhouse.sh > /tmp/install1.log 2>&1; echo "install1 rc $?" >> $OUT/lanes.log) &
cp kernels/configs/NVIDIA_H200.json $OUT/a/old_table.json
cp kernels/configs/NVIDIA_H200.json $OUT/a/NVIDIA_H200.json
timeout 330 python -m kernels.w4a16_autotune --shapes 2560x8192 3072x2560 2560x2048 16384x2560 2048x2560 8192x8192 --ms 1 2 4 8 16 --kernels gemv_mma gemv_mma8 --merge --out $OUT/a/NVIDIA_H200.json > $OUT/a/autotune.log 2>&1; echo "tune rc $? ${SECONDS}s" >> $OUT/lanes.log
grep " M=" $OUT/a/autotune.log | cut -c1-190
cp $OUT/a/NVIDIA_H200.json kernels/configs/NVIDIA_H200.json
timeout 90 python bench/gpu/table_ab.py --old $OUT/a/old_table.json > $OUT/a/table_ab.log 2>&1; echo "ab rc $? ${SECONDS}s" >> $OUT/lanes.log
cat $OUT/a/table_ab.log
timeout 130 python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short tests/test_kernels_fast_gpu.py -k "sweep or untuned or cuda_graph or deterministic" > $OUT/t/table_tests.log 2>&1; echo "tests rc $? ${SECONDS}s" >> $OUT/lanes.log
wait
cat $OUT/lanes.log; tail -2 $OUT/t/table_tests.log
