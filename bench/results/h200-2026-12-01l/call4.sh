# Call 4: E4B-shaped end to end in vLLM 0.26.0's default graph mode, `fast` (with the split-K down_proj entries)
# and Marlin forced, on the same random checkpoints; the bench now records pdqkit's launch census per engine
# (which of our kernels ran from Python: compile and capture runs, and prefill batches beyond the captured sizes).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p $OUT/e2e
timeout 560 python bench/vllm_e2e_bench.py --variants w4a16-pdqkit-fast,w4a16-marlin --reps 1 --budget-s 520 --out $OUT/e2e > $OUT/e2e/stdout.log 2>&1; echo "bench rc $? ${SECONDS}s"
tail -30 $OUT/e2e/stdout.log
python - <<'PY'
import json, os
p = os.path.join(os.environ["OUT"], "e2e", "vllm_e2e_bench.json")
if os.path.exists(p):
    d = json.load(open(p))
    for name, r in d.get("variants", {}).items():
        for key, e in sorted((r.get("launches") or {}).items()):
            print(name, key, e)
PY
ls $OUT/e2e
