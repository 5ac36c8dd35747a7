W=/tmp/s43/qbwork; export PDQKIT_PLAN_CACHE=$W/caches/plans PDQKIT_HASH_CACHE=$W/caches/hashes
PY=/work/main/.venv/bin/python
cat /proc/loadavg
for i in 1 2 3 4 5; do for v in old new; do d=$([ $v = old ] && echo /tmp/s43/old || echo /work/main); for r in eager fp32div; do
  (cd $d && /usr/bin/time -f "$v $r %e %U %S" $PY -m pack.quantize $W/gemma4-e4b-L10-kv4-v32768-bf16 -o /tmp/s43/ab/o_${v}_${r} --force --no-progress --rounding $r 2>&1 | tail -1)
done; done; done
cat /proc/loadavg
for r in eager fp32div; do cmp <(cd /tmp/s43/ab/o_old_$r && cat *.safetensors | sha256sum) <(cd /tmp/s43/ab/o_new_$r && cat *.safetensors | sha256sum) && echo "$r safetensors identical"; done
