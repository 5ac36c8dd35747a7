import os, subprocess, sys, time, json, tempfile, shutil
from pathlib import Path
CK = "/work/main/out/bench/gemma4-e4b-L10-kv4-v32768-bf16"
PY = "/work/main/.venv/bin/python"
def run(argv, cwd, env=None):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, st, ru = os.wait4(p.pid, 0)
    w = time.perf_counter() - t0
    assert os.waitstatus_to_exitcode(st) == 0, p.stderr.read()
    return dict(wall=round(w, 3), cpu=round(ru.ru_utime + ru.ru_stime, 3), rss_gib=round(ru.ru_maxrss / 2**20, 3))
def readall():
    with open(CK + "/model.safetensors", "rb") as f:
        while f.read(64 << 20): pass
res = {k: [] for k in ["llmc", "hash_cold", "nohash_cold", "hash_warm", "nohash_warm"]}
warm = {"hash": tempfile.mkdtemp(), "nohash": tempfile.mkdtemp()}
for tag, cwd in [("hash", "/work/main"), ("nohash", "/tmp/nohash")]:  # prime warm caches
    run([PY, "-m", "pack.quantize", CK, "-o", f"/tmp/nh-{tag}", "--force", "--no-progress"], cwd, dict(os.environ, PDQKIT_PLAN_CACHE=warm[tag]))
R = int(sys.argv[1])
for i in range(R):
    for tag, cwd in [("hash", "/work/main"), ("nohash", "/tmp/nohash")]:
        for mode in ["cold", "warm"]:
            cache = tempfile.mkdtemp() if mode == "cold" else warm[tag]
            readall()
            r = run([PY, "-m", "pack.quantize", CK, "-o", f"/tmp/nh-{tag}", "--force", "--no-progress"], cwd, dict(os.environ, PDQKIT_PLAN_CACHE=cache))
            res[f"{tag}_{mode}"].append(r)
            if mode == "cold": shutil.rmtree(cache)
    if i < int(sys.argv[2]):
        readall()
        shutil.rmtree("/tmp/nh-llmc", ignore_errors=True)
        res["llmc"].append(run(["/tmp/ciclone6/.oracle-venv/bin/python", "/work/main/tests/oracle/llmc_oneshot.py", CK, "/tmp/nh-llmc"], "/work/main"))
    print(i, json.dumps({k: v[-1] for k, v in res.items() if v}), flush=True)
json.dump(res, open("/tmp/nh_res.json", "w"), indent=1)
best = min(r["wall"] for r in res["llmc"])
for k, v in res.items():
    print(f"{k:12s} wall {[r['wall'] for r in v]} cpu {[r['cpu'] for r in v]} best {min(r['wall'] for r in v):.2f} -> {best/min(r['wall'] for r in v):.2f}x  floor {min(r['cpu'] for r in v)/2:.2f}s rss {max(r['rss_gib'] for r in v)}")
