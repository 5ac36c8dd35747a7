# Forty-second session, call 7 (carry .whl-newest): transformers 5.24.0 / compressed-tensors 0.20.1 as in call 6;
# the HF greedy-generation test through pdqkit's W4A16Linear (a checkpoint written by pack.quantize, loaded by
# from_pretrained, its Linears swapped for the fast kernel).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PDQKIT_CORPUS_UNPINNED=1
mkdir -p $OUT/t
python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-new .whl-newest/*.whl > $OUT/install_new.log 2>&1
echo "install_new rc $?"
export PYTHONPATH=/tmp/site-new
python -c "import transformers, compressed_tensors; print(transformers.__version__, compressed_tensors.__version__)"
timeout 400 python -m pytest -m gpu -q -p no:cacheprovider -rA --tb=short tests/test_kernels_fast_gpu.py \
  -k hf_generation > $OUT/t/kernels_hf.log 2>&1
echo "kernels_hf rc $? ${SECONDS}s"; tail -1 $OUT/t/kernels_hf.log
grep -h -i "FutureWarning\|DeprecationWarning" $OUT/t/kernels_hf.log | sort | uniq -c | head
