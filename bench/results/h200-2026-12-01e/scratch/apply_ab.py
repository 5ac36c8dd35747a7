"""Call 7 (twenty-ninth session), run as scratch_apply.py from the repository root: keep the candidate table's
entries whose one-process A/B (bench/gpu/table_ab.py's log) gave >= 1.01x, HEAD's elsewhere. Kept as a record.
python scratch_apply.py TABLE_AB_LOG HEAD_TABLE CANDIDATE_TABLE OUT"""
import json, re, sys
log, head, cand, out = sys.argv[1:5]
h, c = json.load(open(head)), json.load(open(cand))
keep = []
for ln in open(log):
    m = re.match(r"(\d+x\d+) M=(\d+): old .* x([\d.]+)$", ln.strip())
    if m:
        s, mm, g = m.group(1), m.group(2), float(m.group(3))
        if g >= 1.01:
            h["shapes"][s][mm] = c["shapes"][s][mm]
            keep.append(f"{s} M={mm} x{g:.3f}")
h["date"] = c["date"]
print("kept:", keep)
json.dump(h, open(out, "w"), indent=1, sort_keys=True)
open(out, "a").write("\n")
