"""CPU tests of bench/vllm_e2e_bench.py's argument handling (the engines themselves need a GPU and vLLM).

``--decode-steps`` once reached the engine as strings (``T0 + "256"``) and every engine of the first H200 run
died after loading (2026-11-29): the counts must arrive as ints, keyed by batch size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.vllm_e2e_bench import BATCHES, parse_decode_steps  # noqa: E402


def test_decode_steps_are_ints_keyed_by_batch():
    steps = parse_decode_steps("1:256,16:128,64:128")
    assert steps == {"1": 256, "16": 128, "64": 128}
    spec = json.loads(json.dumps({"decode_steps": steps}))  # as the engine process reads its spec
    t0 = 16
    assert all(t0 + spec["decode_steps"][str(b)] > t0 for b in BATCHES)


@pytest.mark.parametrize("bad", ["1:256,16:128", "1:x,16:1,64:1", "1-256", "1:0,16:1,64:1"])
def test_decode_steps_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="--decode-steps"):
        parse_decode_steps(bad)


def test_cli_rejects_bad_decode_steps_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench/vllm_e2e_bench.py"), "--decode-steps", "1:5",
                        "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--decode-steps" in r.stderr and not (tmp_path / "w").exists()


def test_resume_only_under_the_same_settings(tmp_path, capsys):
    """Variants measured under other settings (another scale, prompt length, compile mode...) are measured again,
    never put into one table with this call's; the same settings resume; the reference column only for e4b."""
    import json

    from bench.vllm_e2e_bench import _table, resume_state

    f = tmp_path / "r.json"
    micro = {"scale": "micro", "prompt_len": 64}
    f.write_text(json.dumps({"settings": micro, "variants": {"w4a16-marlin": {"decode": {}}}}))
    assert resume_state(f, micro)["variants"] == {"w4a16-marlin": {"decode": {}}}
    fresh = resume_state(f, {**micro, "scale": "e4b"})
    assert fresh == {"variants": {}, "settings": {**micro, "scale": "e4b"}}
    assert "measured with other settings" in capsys.readouterr().out
    f.write_text(json.dumps({"variants": {"w4a16-marlin": {}}}))   # a file written before settings were recorded
    assert resume_state(f, micro)["variants"] == {}
    dec = {str(b): {"ms_per_step": 4.0, "tok_s": 250.0} for b in BATCHES}
    res = {"bf16-full": {"decode": dec, "prefill": {"tok_s": 1.0}}}
    assert "4.35" in _table(res) and "4.35" not in _table(res, with_reference=False)
