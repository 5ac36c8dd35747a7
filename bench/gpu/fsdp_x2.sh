#!/usr/bin/env bash
# Issue #8 on nvidia-h200-x2: distillation on two H200s with FSDP2 over NCCL, in two device calls on one warm
# machine (the second needs the first's /tmp/pdq-quality).
#
#   PART=throughput OUT=$OUT bash bench/gpu/fsdp_x2.sh   # E4B-shaped pair: 1 GPU vs 2 GPUs (weak scaling)
#   PART=parity     OUT=$OUT bash bench/gpu/fsdp_x2.sh   # trained `small` pair: 1- vs 2-process loss curves
#
# throughput: while GPU 1 trains, evaluates and prunes the `small` teacher for the parity part (quality_pipeline,
# ~3 min), GPU 0 measures the one-GPU E4B baseline; then both GPUs run the same per-GPU batch under torchrun
# (global batch 32 = 16 per rank), and a larger per-rank batch that one GPU cannot hold (24 per rank, chunk 2048:
# out of memory on one GPU in the second session; batch 16 alone peaks at 118.8 GB). parity: loss_parity.py (same
# run as 1 and 2 processes), then the one-GPU E4B baseline again with the other GPU idle (the throughput part's
# baseline shared the host with the training job).
#
# NVLink multicast stays off (the device docs: it can take the host's GPUs out of service): the image sets
# NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1; they are set again here.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TQDM_DISABLE=1
FINAL=${OUT:?set OUT}
PART=${PART:?set PART=throughput or PART=parity}
# everything goes to one folder, packed into $OUT/$PART.tar.xz on exit (few files come back from $OUT)
OUT=$FINAL/$PART
mkdir -p "$OUT"
trap 'tar -C "$FINAL" -cJf "$FINAL/$PART.tar.xz" "$PART" && rm -rf "$OUT"' EXIT
E4B=(--pairs e4b --attn pdq_hybrid --loss-impl fused --compile-loss --out "$OUT")
stamp() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.txt"; }
FAIL=0
step() { local rc=$1; shift; stamp "$* rc $rc"; (( rc == 0 )) || FAIL=1; }  # the exit status: 1 if any step failed
e4b_one_gpu() {  # the one-GPU E4B baseline on GPU 0 -> $OUT/$1.{json,log}
  CUDA_VISIBLE_DEVICES=0 timeout -k 15 200 python bench/gpu/distill_bench.py "${E4B[@]}" \
    --configs "1,16,2048,1,1024" --json-name "$1.json" > "$OUT/$1.log" 2>&1
}

case "$PART" in
throughput)
  stamp "machine"
  { nvidia-smi; nvidia-smi topo -m; python -c 'import torch, triton; print(torch.__version__, triton.__version__,
    torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])';
    env | grep -E 'NVLS|MULTICAST' ; nproc; free -g; } > "$OUT/machine.txt" 2>&1
  [ "$(python -c 'import torch; print(torch.cuda.device_count())')" = 2 ] || { stamp "need 2 GPUs"; exit 2; }
  stamp "small pipeline on GPU 1 (background)"
  CUDA_VISIBLE_DEVICES=1 timeout -k 15 330 python bench/gpu/quality_pipeline.py --stages train,eval,prune \
    --criteria activation --train-args "--steps 360 --time-budget 115" --out "$OUT/quality" --deadline 320 \
    > "$OUT/quality.log" 2>&1 &
  qpid=$!
  stamp "E4B, 1 GPU (GPU 0)"
  e4b_one_gpu e4b_1gpu
  step $? "1 GPU"; stamp "waiting for the small pipeline"
  wait $qpid; step $? "small pipeline"
  stamp "E4B, 2 GPUs (FSDP2)"
  timeout -k 15 260 torchrun --standalone --nproc-per-node 2 bench/gpu/distill_bench.py "${E4B[@]}" \
    --configs "1,32,2048,1,1024;1,48,2048,1,2048" --json-name e4b_2gpu.json > "$OUT/e4b_2gpu.log" 2>&1
  step $? "2 GPUs"
  tail -n 8 "$OUT/e4b_1gpu.log" "$OUT/e4b_2gpu.log"; tail -n 5 "$OUT/quality.log"
  ls -la /tmp/pdq-quality >> "$OUT/quality.log" 2>&1
  ;;
parity)
  [ -d /tmp/pdq-quality/pruned-activation ] || { stamp "no /tmp/pdq-quality/pruned-activation: run PART=throughput first on this warm machine"; exit 2; }
  stamp "loss parity, small, phase 1, 1 vs 2 processes"
  timeout -k 15 300 python bench/gpu/loss_parity.py --teacher /tmp/pdq-quality/base \
    --student /tmp/pdq-quality/pruned-activation --nproc 2 --steps 100 --out "$OUT" > "$OUT/loss_parity.log" 2>&1
  step $? "parity"
  cp /tmp/pdq-parity/one.jsonl "$OUT/parity_one.jsonl"; cp /tmp/pdq-parity/many.jsonl "$OUT/parity_many.jsonl"
  stamp "E4B, 1 GPU, alone"
  e4b_one_gpu e4b_1gpu_alone
  step $? "1 GPU alone"
  tail -n 6 "$OUT/loss_parity.log" "$OUT/e4b_1gpu_alone.log"
  ;;
*) echo "PART must be throughput or parity" >&2; exit 2 ;;
esac
exit "$FAIL"
