"""Repeat runs (warm caches) of three pdqkit builds, interleaved, with llmcompressor's oneshot beside them."""
import os, subprocess, sys, time, json, tempfile, shutil
CK = "/work/main/out/bench/gemma4-e4b-L10-kv4-v32768-bf16"
PY = "/work/main/.venv/bin/python"
ORACLE = "/tmp/ciclone/.oracle-venv/bin/python"
VARIANTS = [("f2c8549", "/tmp/ab-f2"), ("head", "/work/main")]
def run(argv, cwd, env=None):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, st, ru = os.wait4(p.pid, 0)
    w = time.perf_counter() - t0
    out = p.stdout.read()
    assert os.waitstatus_to_exitcode(st) == 0, p.stderr.read()
    return dict(wall=round(w, 3), cpu=round(ru.ru_utime + ru.ru_stime, 3), rss_gib=round(ru.ru_maxrss / 2**20, 3),
                line=(out.strip().splitlines() or [""])[-1])
def readall():
    with open(CK + "/model.safetensors", "rb") as f:
        while f.read(64 << 20): pass
res = {k: [] for k in ["llmc"] + [v for v, _ in VARIANTS]}
caches = {tag: tempfile.mkdtemp(prefix=f"ab33-{tag}-") for tag, _ in VARIANTS}
env = lambda tag: dict(os.environ, PDQKIT_PLAN_CACHE=caches[tag] + "/plans", PDQKIT_HASH_CACHE=caches[tag] + "/hashes")
for tag, cwd in VARIANTS:  # prime
    run([PY, "-m", "pack.quantize", CK, "-o", f"/tmp/ab33-{tag}", "--force", "--no-progress"], cwd, env(tag))
R, L = int(sys.argv[1]), int(sys.argv[2])
for i in range(R):
    for tag, cwd in VARIANTS:
        readall()
        r = run([PY, "-m", "pack.quantize", CK, "-o", f"/tmp/ab33-{tag}", "--force", "--no-progress"], cwd, env(tag))
        assert "plan cached" in r["line"], r["line"]
        res[tag].append(r)
    if i < L:
        readall()
        shutil.rmtree("/tmp/ab33-llmc", ignore_errors=True)
        res["llmc"].append(run([ORACLE, "/work/main/tests/oracle/llmc_oneshot.py", CK, "/tmp/ab33-llmc"], "/work/main"))
    print(i, json.dumps({k: {kk: vv for kk, vv in v[-1].items() if kk != "line"} for k, v in res.items() if v}), flush=True)
json.dump(res, open(sys.argv[3], "w"), indent=1)
best = min(r["wall"] for r in res["llmc"])
print("summary lines:", {k: v[-1]["line"][-120:] for k, v in res.items() if k != "llmc"})
for k, v in res.items():
    print(f"{k:10s} wall {[r['wall'] for r in v]} cpu {[r['cpu'] for r in v]} best {min(r['wall'] for r in v):.2f} "
          f"-> {best / min(r['wall'] for r in v):.2f}x, median -> {best / sorted(r['wall'] for r in v)[len(v) // 2]:.2f}x, "
          f"least CPU {min(r['cpu'] for r in v):.2f} s, rss {max(r['rss_gib'] for r in v)}")
for tag, _ in VARIANTS[1:]:
    a = open(f"/tmp/ab33-{tag}/model.safetensors", "rb").read() == open("/tmp/ab33-f2c8549/model.safetensors", "rb").read()
    print(tag, "model.safetensors identical to shipped:", a)
