# Forty-fourth session, call 1 (a fresh machine, carry .wheelhouse/part1): the GPU tests of what this session
# changed, in three lanes: distill's stop on a signal and kill -9 + --resume on CUDA (deterministic kernels);
# the ops' fake implementations (torch.compile, CUDA graphs, W4A16Linear in HF generation); prune / distill loading
# through pack/hfload.py on CUDA.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> $OUT/device.txt
git log --oneline -1 >> $OUT/device.txt
bash .wheelhouse/part1/install-wheelhouse.sh > $OUT/install1.log 2>&1; echo "install1 rc $?"
export PYTHONPATH=/tmp/site
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=8"
L=500
(timeout $L $PT tests/test_distill_stop.py tests/test_distill_run.py > $OUT/t/distill.log 2>&1; echo "distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_kernels_fast_gpu.py -k "op_and_torch_compile or hf_generation or cuda_graph or bias_channelwise or operands_on" tests/test_marlin_exact_gpu.py -k "op_matches or op_and_torch_compile or hf_generation or cuda_graph or bias_channelwise or operands_on" > $OUT/t/kernels.log 2>&1; echo "kernels rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout $L $PT tests/test_prune.py tests/test_distill_parallel_device.py tests/test_distill_ce.py > $OUT/t/prune_distill.log 2>&1; echo "prune_distill rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
for f in $OUT/t/*.log; do echo "$(basename $f): $(tail -1 $f)"; done
