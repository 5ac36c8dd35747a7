# call 3 of the forty-third session's second lease: the vLLM plugin's GPU test on the real vLLM 0.26.0
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p $OUT/t
bash .wheelhouse/part3/install-wheelhouse.sh > $OUT/install3.log 2>&1; echo "install3 rc $?"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
python -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
timeout 400 python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short tests/test_vllm_plugin.py tests/test_vllm_plugin_api.py > $OUT/t/vllm_plugin.log 2>&1; echo "rc $?"
tail -3 $OUT/t/vllm_plugin.log
