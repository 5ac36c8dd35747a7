"""A tuned-table file for the trained `small` model's shapes that sends every M > 32 to ``prefill_wsp``, one mode per
shape, and M <= 32 to what the heuristic picks (so the GEMVs run at batch 1..16): for
``vllm_e2e_check.py --fast-table``. Not a tuned table: a routing table for a correctness check.
``python make_table.py OUT.json [DEVICE]``"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from kernels.w4a16_config import W4A16Config as C, heuristic_config  # noqa: E402

WSP = {  # N x K of the small model's quantized Linears in vLLM (merged qkv / gate_up) -> one prefill_wsp mode each
    (768, 512): C("prefill_wsp", 128, 128, 128, num_warps=4, num_stages=4),                 # 128 rows
    (1536, 512): C("prefill_wsp", 256, 128, 128, num_warps=4, num_stages=3),                # 256 rows
    (512, 512): C("prefill_wsp", 128, 64, 128, num_warps=4, num_stages=5),                  # K halves
    (512, 1024): C("prefill_wsp", 128, 128, 128, num_warps=4, num_stages=4, stream_k=True),  # stream-K
    (5120, 512): C("prefill_wsp", 128, 128, 128, num_warps=4, num_stages=3, split_k=2),     # split-K
    (512, 2560): C("prefill_wsp", 128, 64, 128, num_warps=4, num_stages=5, split_k=3),      # K halves + split-K
}
shapes = {}
for (n, k), wsp in WSP.items():
    by_m = {str(m): heuristic_config(m, n, k, 128, 132, gemv=True).to_json() for m in (1, 2, 4, 8, 16, 32)}
    by_m["1048576"] = wsp.to_json()
    shapes[f"{n}x{k}"] = by_m
out = {"device": sys.argv[2] if len(sys.argv) > 2 else "NVIDIA H200", "note": __doc__.split("\n")[0],
       "shapes": shapes}
Path(sys.argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
for s, by_m in shapes.items():
    print(s, {m: C(**c).brief() for m, c in by_m.items()})
