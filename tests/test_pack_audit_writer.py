"""Mutation audit of pack/writer.py (closing summary, lineage step, quant_recipe.json, tool provenance) and
pack/card.py (model card figures and snippets, vllm_config.yaml), filling what tests/test_pack_quantize.py,
test_pack_recipes.py, test_pack_checkpoint.py and test_pack_errors.py leave open.

One module-scoped run quantizes a tiny random multimodal Gemma-4 (bench/factory.py "micro") into several shards
(``max_shard_size="2MB"``), with ``SOURCE_DATE_EPOCH`` set and ``vllm_max_model_len`` below the model's
``max_position_embeddings``; no plan or hash cache. Every expectation is computed independently from what the run
wrote (safetensors headers, ``os.stat``, the lineage file, git, /proc/self/status), not from pdqkit's own code.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors import safe_open

import pack
from pack import card
from pack.qconfig import QuantRecipe
from pack.writer import quantize_checkpoint

EPOCH = 1_790_000_123     # any Unix time: the run must stamp exactly this one
MAX_LEN = 1024            # below micro's max_position_embeddings (4096): the cap the yaml and the card must carry
QUANT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def _vm_hwm() -> int:
    """This process's peak resident set so far, in bytes, as the kernel reports it (/proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("base") / "mm-micro", multimodal=True, seed=7)


@pytest.fixture(scope="module")
def run(base, tmp_path_factory) -> SimpleNamespace:
    """The quantize run every test inspects, with what was measured around it."""
    out = tmp_path_factory.mktemp("q") / "w4a16"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
        hwm_before, t0 = _vm_hwm(), time.perf_counter()
        res = quantize_checkpoint(base, out, QuantRecipe(), max_shard_size="2MB", vllm_max_model_len=MAX_LEN,
                                  plan_cache=False, hash_cache=False, fsync=False)
        wall, hwm_after = time.perf_counter() - t0, _vm_hwm()
    return SimpleNamespace(res=res, out=out, wall=wall, hwm=(hwm_before, hwm_after))


def _keys(d: Path) -> dict[str, str]:
    """{tensor name: file name} over every safetensors file of ``d``."""
    keys = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.update({k: f.name for k in fh.keys()})
    return keys


def _tensor_bytes(d: Path) -> int:
    total = 0
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                n = 1
                for s in t.get_shape():
                    n *= s
                total += n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}[t.get_dtype()]
    return total


def _fake_plan(max_pos, multimodal=False, fix=None) -> SimpleNamespace:
    """The plan fields pack.card reads, for unit checks of the card and the vLLM settings."""
    return SimpleNamespace(architecture="Gemma4ForCausalLM", targeted=["a"], quantization_config={"ignore": []},
                           serving={"max_position_embeddings": max_pos, "multimodal": multimodal,
                                    "head_dim_fix": fix})


def _llm_kwargs(card_text: str) -> dict:
    (llm_line,) = [ln for ln in card_text.splitlines() if ln.startswith("llm = LLM(")]
    call = ast.parse(llm_line).body[0].value
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _summary_figures(line: str) -> dict:
    m = re.fullmatch(
        r"pdqkit quantize: (?P<mods>\d+) Linears quantized \((?P<qt>\d+) tensors\), (?P<kept>\d+) tensors kept, "
        r"(?P<dropped>\d+) dropped; (?P<gb_in>[\d.]+) GB in -> (?P<gb_out>[\d.]+) GB out in (?P<secs>[\d.]+) s "
        r"\((?P<gbps>[\d.]+|inf) GB/s; streaming (?P<stream>[\d.]+|inf) GB/s; plan (?P<plan>\w+); "
        r"(?P<hc>\d+) of (?P<hn>\d+) input hashes cached\); peak RSS (?P<rss>[\d.]+) GiB -> (?P<out>.+)", line)
    assert m, line
    return m.groupdict()


def _steps(out: Path) -> list[dict]:
    return json.loads((out / "pdqkit_lineage.json").read_text())["source_lineage"]


# ---------------------------------------------------------------------------------------------- summary line


def test_summary_counts_are_the_tensors_in_the_files(base, run):
    """The closing summary's counts are what the output files hold: Linears quantized = weight_packed tensors,
    quantized tensors = packed + scale + shape tensors, kept = every other output tensor, dropped = input tensors
    neither written nor replaced by a quantized Linear (QuantizeResult.dropped lists exactly those, sorted); plan
    built and 0 of N input hashes cached when both caches are off; the path is the output dir."""
    res, out = run.res, run.out
    src, dst = _keys(base), _keys(out)
    packed = [k.removesuffix(".weight_packed") for k in dst if k.endswith(".weight_packed")]
    quant = [k for k in dst if k.endswith(QUANT_SUFFIXES)]
    dropped = sorted(set(src) - set(dst) - {f"{m}.weight" for m in packed})
    assert packed and dropped and len(quant) == 3 * len(packed)
    f = _summary_figures(res.summary())
    assert (int(f["mods"]), int(f["qt"]), int(f["kept"]), int(f["dropped"])) == \
        (len(packed), len(quant), len(dst) - len(quant), len(dropped))
    assert (res.quantized_modules, res.quantized_tensors, res.kept_tensors) == \
        (len(packed), len(quant), len(dst) - len(quant))
    assert res.dropped == dropped and res.cast == []
    n_inputs = len(list(base.glob("*.safetensors")))
    assert (f["plan"], int(f["hc"]), int(f["hn"])) == ("built", 0, n_inputs)
    assert res.hashes_cached == (0, n_inputs) and res.plan_cached is False
    assert Path(f["out"]) == out.resolve() == res.out


def test_summary_bytes_are_the_weight_files_sizes(base, run):
    """bytes in / bytes out are the sizes (os.stat) of the input's and the output's safetensors files, every
    shard counted; the summary prints them in decimal GB (checked at a scale where the unit shows)."""
    res, out = run.res, run.out
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1   # several shards: bytes out must count every one of them
    assert res.bytes_out == sum(os.stat(p).st_size for p in shards)
    assert res.bytes_in == sum(os.stat(p).st_size for p in base.glob("*.safetensors"))
    big = dataclasses.replace(res, bytes_in=res.bytes_in * 10**4, bytes_out=res.bytes_out * 10**4)
    f = _summary_figures(big.summary())
    assert abs(float(f["gb_in"]) * 1e9 - big.bytes_in) <= 0.0005e9
    assert abs(float(f["gb_out"]) * 1e9 - big.bytes_out) <= 0.0005e9


def test_summary_times_and_rates(run):
    """The run's seconds are its wall time (measured around the call) and include the streaming seconds; GB/s is
    GB in per second overall, streaming GB/s GB in per streaming second (each printed with 2 decimals, checked on
    a result with round figures), and a zero duration prints inf rather than dividing by zero."""
    res = run.res
    assert 0 < res.stream_seconds <= res.seconds <= run.wall
    f = _summary_figures(res.summary())
    assert abs(float(f["secs"]) - res.seconds) <= 0.005
    r = dataclasses.replace(res, bytes_in=12 * 10**9, seconds=4.0, stream_seconds=1.5)
    f = _summary_figures(r.summary())
    assert float(f["gbps"]) == pytest.approx(12 / 4.0, abs=0.005) == r.gbps
    assert float(f["stream"]) == pytest.approx(12 / 1.5, abs=0.005)
    z = _summary_figures(dataclasses.replace(res, seconds=0.0, stream_seconds=0.0).summary())
    assert z["gbps"] == z["stream"] == "inf"


def test_summary_peak_rss_is_the_process_peak(run):
    """peak RSS is this process's peak resident set in bytes (between the kernel's VmHWM before and after the
    run), printed in GiB."""
    res = run.res
    assert run.hwm[0] <= res.peak_rss <= run.hwm[1]
    f = _summary_figures(res.summary())
    assert abs(float(f["rss"]) * 2**30 - res.peak_rss) <= 0.005 * 2**30


# ---------------------------------------------------------------------------------------------- lineage, recipe


def test_quant_step_records_format_calibration_input_and_time(base, run):
    """The quant lineage step names the format, an empty calibration list (data-free), the input dir's name and
    the SOURCE_DATE_EPOCH time in UTC ISO form; quant_recipe.json has schema quant_recipe/1 (spec §6), the same
    time and tool, and the same lineage as pdqkit_lineage.json."""
    steps = _steps(run.out)
    quant = steps[-1]
    when = dt.datetime.fromtimestamp(EPOCH, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert quant["kind"] == "quant" and quant["format"] == "compressed-tensors/pack-quantized"
    assert quant["calibration"] == [] and quant["input_dir"] == base.name and quant["created"] == when
    recipe = json.loads((run.out / "quant_recipe.json").read_text())
    assert recipe["schema"] == "quant_recipe/1" and recipe["created"] == when
    assert recipe["tool"] == quant["tool"] and recipe["source_lineage"] == steps


def test_tool_names_pdqkit_its_version_and_commit(run):
    """The tool entry names pdqkit, its version (the installed distribution's or pyproject.toml's), the git commit
    of the repository the code ran from (none outside a checkout), and git_dirty exactly when pack/ or
    pyproject.toml differ from it."""
    import tomllib
    from importlib.metadata import version

    tool = _steps(run.out)[-1]["tool"]
    repo = Path(pack.__file__).resolve().parent.parent
    assert tool["name"] == "pdqkit"
    assert tool["version"] in {version("pdqkit"), tomllib.loads((repo / "pyproject.toml").read_text())["project"]
                               ["version"]}
    if not (repo / ".git").exists():   # an installed copy, not a checkout: no commit to name
        assert "git" not in tool and "git_dirty" not in tool
        return
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head and tool["git"] == head
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "pack", "pyproject.toml"],
                           capture_output=True, text=True).stdout.strip()
    assert tool.get("git_dirty", False) is bool(dirty)


# ---------------------------------------------------------------------------------------------- vllm_config.yaml


def test_vllm_config_yaml_caps_the_model_length_and_comments_every_key(run):
    """vllm_config.yaml holds the requested max-model-len when it is below max_position_embeddings, bf16, the
    Triton attention backend, the language-model-only switch of a multimodal model and the head-dim override;
    every setting line follows a comment line saying what it is for."""
    text = (run.out / "vllm_config.yaml").read_text()
    cfg = yaml.safe_load(text)
    mpe = json.loads((run.out / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert MAX_LEN < mpe and cfg["max-model-len"] == MAX_LEN
    assert cfg["dtype"] == "bfloat16" and cfg["attention-backend"] == "TRITON_ATTN"
    assert set(cfg) == {"dtype", "max-model-len", "attention-backend", "language-model-only", "hf-overrides"}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("# ") and len(lines[i - 1]) > 3, line


def test_vllm_settings_without_max_position_embeddings_use_the_requested_length():
    """A config that sets no max_position_embeddings serves at the requested max-model-len (whatever its size);
    one that sets it caps the length at it; no switches a text-only, homogeneous model does not need."""
    plan = _fake_plan(None)
    for want in (MAX_LEN, 32 * MAX_LEN):
        s = card.vllm_settings(plan, want)
        assert s["max-model-len"] == want and "language-model-only" not in s and "hf-overrides" not in s
    plan = _fake_plan(MAX_LEN // 2)
    assert card.vllm_settings(plan, MAX_LEN)["max-model-len"] == MAX_LEN // 2
    assert card.vllm_settings(plan, MAX_LEN // 4)["max-model-len"] == MAX_LEN // 4


# ---------------------------------------------------------------------------------------------- model card


def _card(run) -> str:
    return (run.out / "README.md").read_text()


def test_card_llm_snippet_is_the_vllm_config(run):
    """The card's ``LLM(...)`` snippet passes exactly the settings of vllm_config.yaml (CLI names in Python
    spelling): the capped max_model_len, the language-model-only switch and the nested head-dim override of a
    multimodal model; it is valid Python."""
    settings = yaml.safe_load((run.out / "vllm_config.yaml").read_text())
    kwargs = _llm_kwargs(_card(run))
    assert kwargs.pop("model") == "PATH"
    assert kwargs == {k.replace("-", "_"): v for k, v in settings.items()}


@pytest.mark.parametrize("max_pos, requested", [(None, 32 * MAX_LEN), (MAX_LEN, 8 * MAX_LEN), (8 * MAX_LEN, MAX_LEN)])
def test_card_llm_snippet_is_the_vllm_config_whatever_caps_the_length(max_pos, requested):
    """Whether the requested length or the model's max_position_embeddings is the smaller (or the model sets
    none), the card's LLM(...) snippet carries the max-model-len vllm_config.yaml carries, and every other key."""
    plan = _fake_plan(max_pos, multimodal=True, fix={"text_config": {"global_head_dim": 512}})
    settings = yaml.safe_load(card.vllm_config_yaml(plan, requested))
    kwargs = _llm_kwargs(card.model_card(plan, QuantRecipe(), [], files={}, total_bytes=1, max_model_len=requested))
    assert kwargs.pop("model") == "PATH"
    assert kwargs == {k.replace("-", "_"): v for k, v in settings.items()}
    assert settings["max-model-len"] == min(x for x in (max_pos, requested) if x)


def test_card_front_matter_title_and_hf_snippet_name_the_model(run):
    """The card opens with YAML front matter (library_name transformers, the pdqkit/compressed-tensors tags), its
    title and HF snippet name config.json's architecture, and it states the group size of the run."""
    text = _card(run)
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert meta["library_name"] == "transformers" and {"pdqkit", "compressed-tensors", "w4a16"} <= set(meta["tags"])
    arch = json.loads((run.out / "config.json").read_text())["architectures"][0]
    assert f"\n# W4A16 {arch} (compressed-tensors `pack-quantized`)\n" in text
    assert f"model = transformers.{arch}.from_pretrained(\"PATH\", dtype=torch.bfloat16)" in text
    group = json.loads((run.out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert f"int4 weights (group {group['weights']['group_size']}," in text


def test_card_tensor_data_is_the_bytes_written(run):
    """The card's "Tensor data" figure is the bytes of every tensor in every shard (from the safetensors headers,
    = the index's total_size), in decimal GB."""
    total = _tensor_bytes(run.out)
    assert json.loads((run.out / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == total
    gb = float(re.search(r"^Tensor data: ([\d.]+) GB\.", _card(run), flags=re.M).group(1))
    assert abs(gb * 1e9 - total) <= 0.0005e9


def test_card_tensor_data_unit_at_scale():
    """At a size where units differ (10**12 bytes plus change), model_card prints total_bytes in decimal GB."""
    plan = _fake_plan(None)
    total = 10**12 + 987_654_321
    text = card.model_card(plan, QuantRecipe(), [], files={}, total_bytes=total)
    gb = float(re.search(r"^Tensor data: ([\d.]+) GB\.", text, flags=re.M).group(1))
    assert abs(gb * 1e9 - total) <= 0.0005e9


def test_card_lineage_lists_every_step_in_order(run):
    """The card's Lineage section has one line per lineage step, in order, each with its id, kind, ``from`` link
    (only when the step has one) and its model/method/rounding_mode/init/seed fields."""
    steps = _steps(run.out)
    body = _card(run).split("## Lineage\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in body.splitlines() if ln.startswith("- ")]
    assert len(lines) == len(steps) >= 2
    for line, s in zip(lines, steps):
        assert line.startswith(f"- `{s['id']}`: **{s['kind']}**"), line
        if "from" in s:
            assert f"(from `{s['from']}`)" in line, line
        else:
            assert "(from " not in line, line
        for k in ("model", "method", "rounding_mode", "init", "seed"):
            if k in s:
                assert f"{k}={s[k]}" in line, (k, line)
    assert "model" in steps[0] and "method" in steps[-1]


# ---------------------------------------------------------------------------------------------- _check_inputs


def test_check_inputs_lists_dropped_sorted_and_casts_only_non_bf16_floats_outside_keep_fp32(tmp_path):
    """_check_inputs returns the input tensors the model does not save, sorted (a stable summary and result), and
    the passthrough tensors it casts to bf16: floats other than bf16, except those transformers keeps in fp32
    (plan.keep_fp32, matched as a name part or a fragment); integer tensors and targeted weights are not cast."""
    from pack.stio import TensorEntry
    from pack.writer import _check_inputs

    def entry(name, dtype, shape):
        return TensorEntry(name=name, file=tmp_path / "model.safetensors", dtype=dtype, shape=shape, start=0, end=0)

    saved = {"m.q_proj.weight": (8, 128), "norm.weight": (128,), "router.scale": (4,), "emb.weight": (16, 128),
             "pos.ids": (4,), "x.gate.bias": (4,)}
    dtypes = {"m.q_proj.weight": "BF16", "norm.weight": "F32", "router.scale": "F16", "emb.weight": "BF16",
              "pos.ids": "I64", "x.gate.bias": "F32"}
    extra = [f"extra.{c}.k_norm.weight" for c in "zyxwvutsrqponmlkjihgfedcba"]
    tensors = {k: entry(k, dtypes[k], s) for k, s in saved.items()}
    tensors.update({k: entry(k, "BF16", (4,)) for k in extra})
    src = SimpleNamespace(tensors=tensors, dir=tmp_path)
    plan = SimpleNamespace(targeted=["m.q_proj"], saved=saved, architecture="X", keep_fp32=("router", "gate.b"))
    dropped, cast = _check_inputs(plan, src, QuantRecipe())
    assert dropped == sorted(extra)
    assert sorted(cast) == ["norm.weight"]


def test_tool_version_without_tomllib(monkeypatch):
    """Python 3.10 (requires-python's floor) has no tomllib: the tool version in the lineage comes from
    pyproject.toml's [project] table all the same (before, an uninstalled checkout raised ModuleNotFoundError)."""
    import sys

    from pack.writer import _pyproject_version

    with_tomllib = _pyproject_version()
    assert with_tomllib not in ("", "unknown")
    monkeypatch.setitem(sys.modules, "tomllib", None)   # import tomllib -> ImportError
    assert _pyproject_version() == with_tomllib
