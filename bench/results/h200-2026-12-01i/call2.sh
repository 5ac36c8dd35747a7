# Call 2: issue #7's recipe (c) on call 1's teacher, scored by the fixed harness (RoPE inv_freq kept fp32), then every
# checkpoint scored again by the harness as it was before the fix (eval_before.py = `git show 14da9da:bench/eval.py`,
# the file that ran; not kept in the repo, git has it), to measure what the fix moves.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=/tmp/site
bash .wheelhouse/part2/install-wheelhouse.sh > /tmp/install2.log 2>&1; echo "install2 rc $?"
mkdir -p $OUT/q
timeout 330 python bench/gpu/quality_pipeline.py --base /tmp/pdq-quality/base --stages eval,prune,distill,final --criteria taylor+refit+train --distill-from taylor+refit+train --token-budget-pct 5 --distill1-variants "hw10-ce0.2-lr2e-4=--hidden-weight 10 --ce-weight 0.2 --lr 2e-4" --distill2-from hw10-ce0.2-lr2e-4 --distill2-args "--lr 2e-5" --out $OUT/q --deadline 320 > $OUT/q/stdout.log 2>&1; echo "quality rc $? ${SECONDS}s"
tail -n 24 $OUT/q/stdout.log
ls /tmp/pdq-quality
# the same checkpoints, both harnesses, one process each (all validation targets, 32 prompts x 32 greedy tokens)
CK=$(for d in /tmp/pdq-quality/*/; do [ -f $d/config.json ] && echo ${d%/}; done | tr '\n' ' ')
rm -rf /tmp/old && mkdir /tmp/old && tar --exclude=.wheelhouse -cf - . | tar -C /tmp/old -xf - && cp bench/results/h200-2026-12-01i/eval_before.py /tmp/old/bench/eval.py
EV="--teacher /tmp/pdq-quality/base --max-tokens 0 --prompts 32 --new-tokens 32 --no-unigram --device cuda"
(timeout 200 python -m bench.eval $CK $EV --json $OUT/eval_fixed.json > $OUT/eval_fixed.txt 2>&1; echo "fixed rc $?") &
(cd /tmp/old && timeout 200 python -m bench.eval $CK $EV --json $OUT/eval_before.json > $OUT/eval_before.txt 2>&1; echo "before rc $?") &
wait
echo "end ${SECONDS}s"; cat $OUT/eval_fixed.txt; cat $OUT/eval_before.txt
