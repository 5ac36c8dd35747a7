# Call 6 (a fresh machine): distill's model hash (distill.train.checkpoint_sha256) in 1, 2 and 4 child processes
# on a 14 GB checkpoint of four 3.5 GB sparse files (zeros: read without the disk, as from the page cache; the
# hash's work does not depend on the bytes), three rounds, each with an empty input-hash cache.
set -u
export PYTHONUNBUFFERED=1
D=/tmp/h6; mkdir -p $D $OUT
for i in 1 2 3 4; do truncate -s 3500000000 $D/model-0000$i-of-00004.safetensors; done
nproc > $OUT/nproc.txt
timeout 200 python - > $OUT/hash_workers.log 2>&1 <<'PY'
import os, tempfile, time
from distill.train import _hash_workers, checkpoint_sha256
print(f"default workers for 4 files: {_hash_workers(4)} (cores {len(os.sched_getaffinity(0))})")
for rnd in range(3):
    for w in (1, 2, 4):
        os.environ["PDQKIT_HASH_CACHE"] = tempfile.mkdtemp()
        t = time.perf_counter(); h = checkpoint_sha256("/tmp/h6", workers=w)
        dt = time.perf_counter() - t
        print(f"round {rnd} workers {w}: {dt:.2f} s ({14e9 / dt / 1e9:.2f} GB/s) {h[:16]}", flush=True)
PY
echo "rc $?" >> $OUT/hash_workers.log
cat $OUT/hash_workers.log
