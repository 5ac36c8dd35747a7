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


def test_hugging_face_kernels_installed_beside_ours_is_said_on_import(tmp_path):
    """Hugging Face's `kernels` distribution installed in the same environment (its metadata is what transformers
    reads a version from) makes transformers import hub-kernel names from our package: importing ours says so, and
    stays silent without it."""
    import os

    dist = tmp_path / "site" / "kernels-0.16.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.16.2\n")
    code = "import warnings; warnings.simplefilter('error'); import kernels; print('ours', kernels.__file__)"
    quiet = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path / "site")]))
    both = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert both.returncode != 0
    assert "UserWarning: pdqkit: Hugging Face's `kernels` 0.16.2 is installed here" in both.stderr
    assert "use separate environments, or `pip uninstall kernels` where pdqkit runs" in both.stderr
