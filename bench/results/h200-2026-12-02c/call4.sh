# Forty-second session, call 6 (carry .whl-newest): transformers 5.24.0, compressed-tensors
# 0.20.1, huggingface_hub 2.4.0, tokenizers 0.23.3, safetensors 0.8.0 (cp312 wheels, --no-deps, numpy left as the
# image has it) in front of the image's packages: the changed stages' GPU tests, then the E4B-shaped distill pair with
# every speed switch (checkpointing inside the compiled forward under 5.24, with Inductor).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PDQKIT_CORPUS_UNPINNED=1
mkdir -p $OUT/t
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt

python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-new .whl-newest/*.whl > $OUT/install_new.log 2>&1
echo "install_new rc $?"
export PYTHONPATH=/tmp/site-new
python -c "import torch, triton, transformers, compressed_tensors, huggingface_hub, tokenizers, safetensors, numpy
print(torch.__version__, triton.__version__, transformers.__version__, compressed_tensors.__version__,
      huggingface_hub.__version__, tokenizers.__version__, safetensors.__version__, numpy.__version__)" >> $OUT/device.txt 2>&1
cat $OUT/device.txt
timeout 330 python -m pytest -m gpu -q -p no:cacheprovider -rA --tb=short \
  tests/test_pack_quantize.py tests/test_observer.py tests/test_packing.py tests/test_distill_ce.py \
  tests/test_distill_parallel_device.py tests/test_distill_run.py tests/test_prune.py > $OUT/t/gpu_tests.log 2>&1
echo "gpu tests rc $? ${SECONDS}s"; tail -1 $OUT/t/gpu_tests.log; grep -h "cuda vs cpu" $OUT/t/gpu_tests.log
grep -h -i "FutureWarning\|DeprecationWarning" $OUT/t/gpu_tests.log | sort | uniq -c | head
timeout 230 python bench/gpu/distill_bench.py --pairs e4b --configs "1,16,2048,1,1024" --attn pdq_hybrid \
  --loss-impl fused --compile-loss --compile-layers --ckpt-layers 28 --precision bf16-master --steps 4 --warmup 2 \
  > $OUT/distill_bench.txt 2>&1
echo "distill_bench rc $? ${SECONDS}s"
grep -E "^e4b|^best|Error|error" $OUT/distill_bench.txt | tail -5
