# Forty-second session, call 5: the E4B-shaped distill pair with every speed switch, on a899a11 (activation
# checkpointing through pack.hfcompat, Dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint set by
# --compile-layers): the same step as the fourth session's 41.0 % MFU row.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
timeout 560 python bench/gpu/distill_bench.py --pairs e4b --configs "1,16,2048,1,1024" --attn pdq_hybrid \
  --loss-impl fused --compile-loss --compile-layers --ckpt-layers 28 --precision bf16-master --steps 4 --warmup 2 \
  > $OUT/distill_bench.txt 2>&1
echo "rc $?"
tail -15 $OUT/distill_bench.txt
