# Call 3: vLLM 0.26.0 (wheelhouse part3). pdqkit's `fast` kernel in vLLM on call 1's trained `small` W4A16, with the
# launch census: (1) the packaged table / heuristics (gemv_mma8 at batch 8, prefill_tma), (2) a routing table that
# sends every M > 32 to prefill_wsp, one mode per shape (make_table.py). Beside them the vLLM GPU tests (the plugin
# now reserves the counter pools at load).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
bash .wheelhouse/part3/install-wheelhouse.sh > /tmp/install3.log 2>&1; echo "install3 rc $?"
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
python -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
mkdir -p $OUT/t $OUT/heur $OUT/wsp
python bench/results/h200-2026-12-01i/make_table.py $OUT/wsp/wsp_small_table.json > $OUT/wsp/table.txt
CK=/tmp/pdq-quality/base-w4a16
A="--ckpt $CK --kernels fast --modes eager --prompts 8 --text-prompts --new-tokens 32 --parallel 3 --timeout 400"
(timeout 450 python bench/gpu/vllm_e2e_check.py $A --work /tmp/e2e-heur --out $OUT/heur > $OUT/heur/check.log 2>&1; echo "heur rc $? ${SECONDS}s" >> $OUT/lanes.log) &
(timeout 450 python bench/gpu/vllm_e2e_check.py $A --fast-table $OUT/wsp/wsp_small_table.json --work /tmp/e2e-wsp --out $OUT/wsp > $OUT/wsp/check.log 2>&1; echo "wsp rc $? ${SECONDS}s" >> $OUT/lanes.log) &
PT="python -m pytest -m gpu -q -p no:cacheprovider -rfEs --tb=short --durations=5"
(timeout 450 $PT tests/test_vllm_plugin.py tests/test_marlin_exact_gpu.py > $OUT/t/vllm_tests.log 2>&1; echo "vllm_tests rc $? ${SECONDS}s" >> $OUT/lanes.log) &
# call 1's kernels_b lane ran out of time (400 s; 150 s last session): again, verbose, to see which test
(timeout 480 $PT -v tests/test_kernels_fast_gpu.py -k "not (sweep or untuned or forced or hf_generation)" > $OUT/t/kernels_b.log 2>&1; echo "kernels_b rc $? ${SECONDS}s" >> $OUT/lanes.log) &
wait
cat $OUT/lanes.log
tail -1 $OUT/t/vllm_tests.log
for l in heur wsp; do echo "== $l"; grep -E "^launches|^fast|^gates|^engine|^default|^marlin|^fast-" $OUT/$l/check.log; done
tar -C $OUT -cJf $OUT/e2e_logs.tar.xz heur/vllm_e2e_check_logs.txt wsp/vllm_e2e_check_logs.txt && rm -f $OUT/heur/vllm_e2e_check_logs.txt $OUT/wsp/vllm_e2e_check_logs.txt
