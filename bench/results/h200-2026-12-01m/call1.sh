set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python -c "import triton, torch; print(triton.__version__, torch.__version__)"
mkdir -p $OUT/s
python bench/gpu/gemv_tma_sweep.py --out $OUT/s --shapes 16384x2560 8192x8192 2560x8192 3072x2560 2560x2048 2048x2560 2>&1 | tee $OUT/s/sweep.log | tail -150
