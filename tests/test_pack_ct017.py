"""The writer under compressed-tensors 0.17.0 (vLLM 0.26.0's pin, what the GPU machine has): same bytes as under
0.19.0, and 0.17.0 parses the quantization_config it wrote.

The suite's venv has compressed-tensors 0.19.0; .ci/run puts 0.17.0 (pure Python, --no-deps) in ``.ct017/``
and names it in ``PDQKIT_CT017_PATH``; the writer then runs in a subprocess with that first on PYTHONPATH.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pack.writer import quantize_checkpoint

REPO = Path(__file__).resolve().parents[1]
CT017 = os.environ.get("PDQKIT_CT017_PATH")

pytestmark = pytest.mark.skipif(
    not CT017, reason="PDQKIT_CT017_PATH is unset: point it at a `pip install --no-deps --target DIR "
                      "compressed-tensors==0.17.0` dir (.ci/run makes .ct017) to test the writer under CT 0.17.0")

_CHILD = """
import json, sys
import compressed_tensors
assert compressed_tensors.__version__.startswith("0.17."), compressed_tensors.__version__
from compressed_tensors.quantization import QuantizationConfig
from pack.quantize import main
rc = main([sys.argv[1], "-o", sys.argv[2], "--no-progress"])
q = json.load(open(sys.argv[2] + "/config.json"))["quantization_config"]
qc = QuantizationConfig.model_validate(q)
assert qc.format == "pack-quantized" and qc.quantization_status == "compressed" and len(qc.ignore) == 36
print("CT", compressed_tensors.__version__, "ok")
sys.exit(rc)
"""


def test_same_bytes_under_ct017(tmp_path):
    from bench.factory import save_random_checkpoint

    base = save_random_checkpoint("micro", tmp_path / "base", multimodal=True, seed=2)
    ref = tmp_path / "ct019"
    quantize_checkpoint(base, ref)
    out = tmp_path / "ct017"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([CT017, str(REPO)]))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CT 0.17.0 ok" in r.stdout
    files = sorted(p.name for p in ref.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for f in files:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f
