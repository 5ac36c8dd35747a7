# Forty-second session, call 2: the prune CUDA-vs-CPU test again, rewritten after call 1 measured that CUDA's
# calibration keeps other channels than the CPU's in some layers (call 1's test wrongly expected the same channels).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
timeout 500 python -m pytest -m gpu -q -p no:cacheprovider -rA --tb=short tests/test_prune.py > $OUT/t/prune.log 2>&1
echo "prune rc $?"
tail -1 $OUT/t/prune.log
grep -h "cuda vs cpu" $OUT/t/prune.log
