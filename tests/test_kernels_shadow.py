"""pdqkit's top-level ``kernels`` package shadows the PyPI ``kernels`` package that transformers probes for.

transformers must still treat hub kernels as unavailable (it would otherwise try ``from kernels import ...``
APIs we don't have) and load models normally; importing ``kernels`` must stay light (no triton at import).
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_transformers_sees_no_hub_kernels_and_loads_models(tmp_path):
    out = _run(
        "import kernels, sys\n"
        "assert 'triton' not in sys.modules, 'importing kernels must not import triton'\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print('ours', kernels.__file__)\n"
        "print('hub', is_kernels_available())\n"
        "from bench.factory import save_random_checkpoint\n"
        f"p = save_random_checkpoint('micro', r'{tmp_path}/m')\n"
        "from transformers import AutoModelForCausalLM\n"
        "import torch\n"
        "m = AutoModelForCausalLM.from_pretrained(p)\n"
        "print('logits', tuple(m(torch.tensor([[2, 5, 7]])).logits.shape))\n"
    )
    assert f"ours {REPO / 'kernels' / '__init__.py'}" in out
    assert "hub False" in out
    assert "logits (1, 3, 2048)" in out
