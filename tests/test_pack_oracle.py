"""Oracle: pdqkit's output vs llmcompressor 0.14.0.1 ``oneshot`` (CPU, so eager rounding) on a tiny multimodal
Gemma-4 (text + vision + audio, PLE, KV-shared layers): same tensors (names, dtypes, shapes, bytes) and the same
``quantization_config`` up to ``version``.

llmcompressor runs in its own venv (``.oracle-venv``, built by .ci/run), never in pdqkit's: the test starts
tests/oracle/llmc_oneshot.py with the interpreter named by ``PDQKIT_ORACLE_PYTHON``.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pack.qconfig import DEFAULT_IGNORE, QuantRecipe
from pack.writer import quantize_checkpoint

ORACLE = Path(__file__).resolve().parent / "oracle" / "llmc_oneshot.py"
PY = os.environ.get("PDQKIT_ORACLE_PYTHON")

pytestmark = pytest.mark.skipif(
    not PY, reason="PDQKIT_ORACLE_PYTHON is unset: set it to the python of a venv with llmcompressor==0.14.0.1 "
                   "(.ci/run builds .oracle-venv) to run the llmcompressor oracle")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("oracle") / "mm-micro", multimodal=True, seed=1)


def _load(f: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(f), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# None: each side uses its own default, pdqkit its QuantRecipe default (pack.qconfig.DEFAULT_IGNORE), the oracle
# its own copy of recipe R's list from the spec, so a wrong entry in pdqkit's list shows up as a difference
IGNORES = {
    "default-ignore": None,
    # exact names and anchored regexes beyond the default: one text layer's MLP, one attention output (both sides
    # get this same explicit list)
    "custom-ignore": list(DEFAULT_IGNORE) + [r"re:model\.language_model\.layers\.1\.mlp\..*",
                                             "model.language_model.layers.0.self_attn.o_proj"],
}


@pytest.fixture(scope="module")
def llmc(base, tmp_path_factory) -> Path:
    """Both recipes through llmcompressor in one oracle process (imports are the slow part)."""
    root = tmp_path_factory.mktemp("llmc")
    jobs = root / "jobs.json"
    jobs.write_text(json.dumps([{"out": str(root / k), **({} if v is None else {"ignore": v})}
                                for k, v in IGNORES.items()]))
    r = subprocess.run([PY, str(ORACLE), str(base), "--jobs", str(jobs)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", list(IGNORES))
def test_same_as_llmcompressor(base, llmc, tmp_path, case):
    ignore = IGNORES[case]
    ref = llmc / case
    ours = tmp_path / "pdqkit"
    recipe = QuantRecipe(rounding="eager") if ignore is None else QuantRecipe(ignore=tuple(ignore), rounding="eager")
    quantize_checkpoint(base, ours, recipe)

    a, b = _load(ours / "model.safetensors"), _load(ref / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert sum(k.endswith(".weight_packed") for k in a) == {"default-ignore": 39, "custom-ignore": 35}[case]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    # even the files are byte-identical (same safetensors layout, metadata {"format": "pt"})
    assert (ours / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()

    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((ref / "config.json").read_text())["quantization_config"]
    qa.pop("version"), qb.pop("version")
    assert qa == qb
