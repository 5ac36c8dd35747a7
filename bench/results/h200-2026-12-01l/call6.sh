# Call 6: should the GEMV heuristic (untuned shapes) split K? The heuristic's config timed with split-K 2..8 beside
# it, the split-K wgmma heuristic and (2560x8192 only) the tuned entry, on long-K down_proj shapes of other models
# (Llama-3.2-1B / 3B, Llama-3-8B, Llama-2-13B, Qwen2-7B) and E4B's, M = 1..16.
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT/h
timeout 230 python bench/gpu/heuristic_check.py --ms 1 2 4 8 16 --splits 2 3 4 6 8 --shapes 2560x8192 2048x8192 3072x8192 4096x14336 5120x13824 3584x18944 > $OUT/h/split_heuristic.log 2>&1; echo "rc $?"
cut -c1-400 $OUT/h/split_heuristic.log | grep -v "^ "
