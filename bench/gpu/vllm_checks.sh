#!/usr/bin/env bash
# All vLLM-side checks of the trained `small` model in one device call (after bench/gpu/quality_pipeline.py ran
# on the same warm machine and the vLLM wheelhouse is installed, see bench/gpu/README.md).
#
# Lanes, run at once (the GPU has room for all; none of them measures speed), chosen with LANES (default A,B,C):
#   A  vllm_e2e_check.py on WORK/base-w4a16: plugin exact/fast vs Marlin, eager (gate) and graph with a
#      Marlin-vs-Marlin control (reported); MODES overrides its --modes (e.g. eager,graph,graph-det), A_ARGS
#      adds arguments (e.g. "--parallel 7")
#   B  pack_vllm_check.py --ckpt WORK/base --serve (CPU vs CUDA bytes, vLLM bf16/Marlin/default, `vllm serve` with
#      the written vllm_config.yaml over HTTP, HF agreement; the server needs the .whl-serve wheels, see
#      bench/gpu/README.md), then
#      prune_vllm_check.py --scales micro-mm --ckpt WORK/base (prune -> quantize -> vLLM chain); B_STEPS=pack or
#      B_STEPS=prune runs one of the two (two instances with their own PDQ_CHECKS_DIR then run them side by side)
#   C  vllm_e2e_bench.py --_gen (the E4B-shaped checkpoints the speed bench needs next call), then the GPU/vLLM
#      pytest suite (HF greedy test on the trained small: PDQKIT_GPU_TRAINED_CKPT)
# JSON reports go to $OUT, every log into $OUT/vllm_checks_logs.tar.xz (the device returns few files).
#
#   OUT=$OUT bash bench/gpu/vllm_checks.sh            # PDQ_WORK (default /tmp/pdq-quality) holds base, base-w4a16
#   OUT=$OUT LANES=A,C bash bench/gpu/vllm_checks.sh  # then LANES=B in the next call (same warm machine)
#   OUT=$OUT LANES=A,C LANE_GPUS=A=0,C=1 bash bench/gpu/vllm_checks.sh   # nvidia-h200-x2: a GPU per lane
#
# All three lanes in one call no longer fit (2026-11-29, eighth session: A took 372 s with its graph engines
# compiling ~150 s each beside the other lanes; B's pack and prune checks and C's pytest hit their timeouts):
# run A and C in one call and B in the next. C runs the kernel/GPU tests and the vLLM test as two pytest runs,
# so a timeout in the slow vLLM test cannot swallow the other tests' failure report. Every step's timeout is cut
# to what is left of DEADLINE (default 560 s from the start: the device's 600 s per call, minus the packing up);
# a step still alive 15 s after its SIGTERM is killed (the e2e driver kills its engines on SIGTERM).
set -u
: "${OUT:?set OUT}"
W=${PDQ_WORK:-/tmp/pdq-quality}
L=${PDQ_CHECKS_DIR:-/tmp/pdq-vllm-checks}  # this call's logs and reports: rm -rf'd at the start
LANES=${LANES:-A,B,C}
[[ $LANES =~ ^[ABC](,[ABC])*$ ]] || { echo "error: LANES=$LANES: give a comma list of A, B, C (e.g. LANES=A,C)" >&2; exit 2; }
B_STEPS=${B_STEPS:-pack,prune}
[[ $B_STEPS =~ ^(pack|prune|pack,prune)$ ]] || { echo "error: B_STEPS=$B_STEPS: give pack, prune or pack,prune" >&2; exit 2; }
# LANE_GPUS=A=0,B=1,C=1 pins lanes to GPUs of a multi-GPU machine (CUDA_VISIBLE_DEVICES per lane), so that the
# graph-mode engines of lane A compile and run with no other lane on their GPU; unset: every lane sees every GPU.
# GPU j is the j-th entry of an inherited CUDA_VISIBLE_DEVICES (a mask is narrowed, never escaped; an index past
# the mask is refused before anything is touched), else device j.
LANE_GPUS=${LANE_GPUS:-}
[[ -z $LANE_GPUS || $LANE_GPUS =~ ^[ABC]=(0|[1-9][0-9]*)(,[ABC]=(0|[1-9][0-9]*))*$ ]] ||
  { echo "error: LANE_GPUS=$LANE_GPUS: give e.g. A=0,B=1,C=1" >&2; exit 2; }
MASKED=0; GPU_POOL=()
if [[ -v CUDA_VISIBLE_DEVICES ]]; then  # set, even empty (= no GPU visible): a mask
  MASKED=1; IFS=, read -r -a GPU_POOL <<< "${CUDA_VISIBLE_DEVICES// /}"
fi
for pair in ${LANE_GPUS//,/ }; do
  j=${pair#*=}
  (( ! MASKED || j < ${#GPU_POOL[@]} )) ||
    { echo "error: LANE_GPUS=$LANE_GPUS: GPU $j is not among CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2; exit 2; }
done
gpu() {  # in a lane's subshell: narrow CUDA_VISIBLE_DEVICES to the lane's GPU (the last entry for the lane wins)
  local pair j=""
  for pair in ${LANE_GPUS//,/ }; do [[ $pair == "$1="* ]] && j=${pair#*=}; done
  [ -z "$j" ] && return 0
  if (( MASKED )); then export CUDA_VISIBLE_DEVICES=${GPU_POOL[$j]}; else export CUDA_VISIBLE_DEVICES=$j; fi
}
for v in DEADLINE A_TIMEOUT GEN_TIMEOUT PYTEST_TIMEOUT VLLM_TEST_TIMEOUT PACK_TIMEOUT PRUNE_TIMEOUT; do
  [[ -z ${!v:-} || ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v=${!v}: give whole seconds" >&2; exit 2; }
done
rm -rf "$L"  # this call's results only (an earlier call's JSON must not come back as this one's)
mkdir -p "$L" "$OUT"
read -r -a A_ARGV <<< "${A_ARGS:-}"  # extra arguments of lane A's driver, split on blanks (no globbing)
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
lane() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L/lanes.log"; }
on() { [[ ",$LANES," == *",$1,"* ]]; }
# seconds for the next step: its own limit, or what is left before DEADLINE if that is less (at least 1)
limit() { local left=$(( DEADLINE - ($(date +%s) - T0) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

finish() {  # copy what there is, also when a lane ran out of time
  for f in "$L/e2e/vllm_e2e_check.json" "$L/pack/pack_vllm_check.json" "$L/prune/prune_vllm_check.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  tar -C "$L" -cJf "$OUT/vllm_checks_logs.tar.xz" --exclude='*.safetensors' --exclude='*-work' \
      $(cd "$L" && ls -d *.log e2e pack/*.log prune/logs 2>/dev/null) 2>/dev/null
}
trap finish EXIT

on A && ( gpu A; lane "A start (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"; timeout -k 15 "$(limit "${A_TIMEOUT:-480}")" python bench/gpu/vllm_e2e_check.py --ckpt "$W/base-w4a16" \
      --text-prompts --modes "${MODES:-eager,graph}" ${A_ARGV[@]+"${A_ARGV[@]}"} --work "$L/e2e-work" --out "$L/e2e" > "$L/e2e_check.log" 2>&1
  lane "A rc=$?" ) &
on C && ( gpu C; lane "C start (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"; timeout -k 15 "$(limit "${GEN_TIMEOUT:-300}")" python bench/vllm_e2e_bench.py --_gen > "$L/e2e_gen.log" 2>&1
  lane "C gen rc=$?"
  PDQKIT_GPU_TRAINED_CKPT="$W/base" timeout -k 15 "$(limit "${PYTEST_TIMEOUT:-300}")" python -m pytest -m "gpu or vllm" -q \
      -p no:cacheprovider -rfE --tb=short --ignore=tests/test_vllm_plugin.py tests/ > "$L/gpu_tests.log" 2>&1
  lane "C pytest rc=$?"; tail -n 3 "$L/gpu_tests.log" | tee -a "$L/lanes.log"
  timeout -k 15 "$(limit "${VLLM_TEST_TIMEOUT:-300}")" python -m pytest -m vllm -q -p no:cacheprovider -rfE --tb=short \
      tests/test_vllm_plugin.py > "$L/vllm_tests.log" 2>&1
  lane "C vllm pytest rc=$?"; tail -n 3 "$L/vllm_tests.log" | tee -a "$L/lanes.log" ) &
if on B; then
  ( gpu B; lane "B start (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"
  if [[ $B_STEPS == *pack* ]]; then
    timeout -k 15 "$(limit "${PACK_TIMEOUT:-480}")" python bench/gpu/pack_vllm_check.py --ckpt "$W/base" --prompts 8 \
        --new-tokens 32 --serve --out "$L/pack" > "$L/pack_check.log" 2>&1; lane "B pack rc=$?"
  fi
  if [[ $B_STEPS == *prune* ]]; then
    timeout -k 15 "$(limit "${PRUNE_TIMEOUT:-240}")" python bench/gpu/prune_vllm_check.py --scales micro-mm --ckpt "$W/base" \
        --prompts 8 --out "$L/prune" > "$L/prune_check.log" 2>&1; lane "B prune rc=$?"
  fi )
fi
wait
lane "all lanes done"
for f in e2e_check pack_check prune_check; do [ -f "$L/$f.log" ] && { echo "== $f"; tail -n 25 "$L/$f.log"; }; done
for f in gpu_tests vllm_tests; do
  [ -f "$L/$f.log" ] && { echo "== $f"; grep -E "passed|failed|FAILED|ERROR" "$L/$f.log" | tail -n 15; }
done
exit 0  # the lanes report their own status above; the JSON reports carry the verdicts
