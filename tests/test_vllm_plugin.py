"""pdqkit's vLLM plugin (kernels/vllm_plugin.py) and its end-to-end check (bench/gpu/vllm_e2e_check.py).

CPU (no vLLM): the entry point is declared and discoverable the way vLLM discovers plugins, the plugin is inert
without ``PDQKIT_VLLM_KERNEL``, the coverage rule, the op signatures the plugin calls, and the comparison logic
of the e2e check. GPU + vLLM (``vllm`` marker): a reduced e2e run, exact == Marlin bit for bit.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.gpu import vllm_e2e_check as e2e
from kernels import vllm_plugin as plugin

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- entry point

def test_entry_point_declared_in_pyproject():
    eps = e2e.pyproject_entry_points(REPO / "pyproject.toml")
    assert eps["vllm.general_plugins"] == {"pdqkit": "kernels.vllm_plugin:register"}
    module, attr = eps["vllm.general_plugins"]["pdqkit"].split(":")
    assert getattr(importlib.import_module(module), attr) is plugin.register


def test_entry_point_discovered_like_vllm_does(tmp_path):
    # vllm/plugins/__init__.py: importlib.metadata.entry_points(group="vllm.general_plugins"), then ep.load()()
    shim = e2e.write_entry_point_shim(tmp_path)
    code = ("from importlib.metadata import entry_points\n"
            "eps = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'pdqkit']\n"
            "import kernels.vllm_plugin as p\n"
            "assert len(eps) == 1 and eps[0].load() is p.register, eps\n"
            "eps[0].load()()\n"
            "import sys; assert 'vllm' not in sys.modules and 'triton' not in sys.modules, 'register() not inert'\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != plugin.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)])
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------------------------- selection

@pytest.mark.parametrize("raw,want", [(None, None), ("", None), ("  ", None), ("fast", "fast"), ("exact", "exact"),
                                      ("EXACT", "exact"), (" Fast ", "fast")])
def test_selected_kernel(raw, want):
    env = {} if raw is None else {plugin.ENV_VAR: raw}
    assert plugin.selected_kernel(env) == want


@pytest.mark.parametrize("raw", ["marlin", "1", "fast,exact"])
def test_selected_kernel_rejects_unknown(raw):
    with pytest.raises(ValueError, match=r"PDQKIT_VLLM_KERNEL=.*one of fast, exact"):
        plugin.selected_kernel({plugin.ENV_VAR: raw})


# ---------------------------------------------------------------------------------------------- coverage

# E4B's W4A16 layers as vLLM builds them (spec pack-quantized.md §2.4/§4.1; fused qkv and gate_up), full and pruned
E4B_LAYERS = {  # name: (N, K)
    "qkv sliding": (2048 + 512 + 512, 2560), "qkv full": (4096 + 1024 + 1024, 2560),
    "o sliding": (2560, 2048), "o full": (2560, 4096),
    "gate_up": (2 * 10240, 2560), "down": (2560, 10240), "gate_up pruned": (2 * 8192, 2560), "down pruned": (2560, 8192),
    "per_layer_model_projection": (10752, 2560),
}


def _cover(**kw):
    args = dict(weight_type="uint4b8", act_dtype=torch.bfloat16, group_size=128, n=2560, k=2560, zero_points=False,
                has_g_idx=False, out_dtype=None)
    args.update(kw)
    return plugin.coverage(**args)


@pytest.mark.parametrize("layer", sorted(E4B_LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [128, -1])
def test_coverage_e4b_layers(layer, dtype, group):
    n, k = E4B_LAYERS[layer]
    assert _cover(n=n, k=k, act_dtype=dtype, group_size=group) == (True, None)


@pytest.mark.parametrize("kw,reason", [
    (dict(weight_type="uint4"), "uint4b8"), (dict(weight_type="uint8b128"), "uint4b8"),
    (dict(zero_points=True), "zero points"), (dict(has_g_idx=True), "act-order"),
    (dict(act_dtype=torch.float32), "activation dtype"), (dict(act_dtype=torch.float8_e4m3fn), "activation dtype"),
    (dict(out_dtype=torch.float16), "output dtype"),
    (dict(group_size=64), "group size 64"), (dict(group_size=32), "group size"), (dict(group_size=256), "group size"),
    (dict(n=2560 + 32), "N=2592"), (dict(n=100), "N=100"), (dict(k=2560 + 64), "K=2624"), (dict(k=192), "K=192"),
])
def test_coverage_rejects_with_reason(kw, reason):
    ok, why = _cover(**kw)
    assert not ok and reason in why


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 40000), k=st.integers(1, 40000), group=st.sampled_from([-1, 32, 64, 128, 256, 2560]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       wtype=st.sampled_from(["uint4b8", "uint4", "uint8b128"]), zp=st.booleans(), gidx=st.booleans())
def test_coverage_is_exactly_the_stated_set(n, k, group, dtype, wtype, zp, gidx):
    # the statement, written independently of the implementation
    stated = (wtype == "uint4b8" and group in (128, -1) and dtype in (torch.bfloat16, torch.float16)
              and n % 64 == 0 and k % 128 == 0 and not zp and not gidx)
    ok, why = _cover(n=n, k=k, group_size=group, act_dtype=dtype, weight_type=wtype, zero_points=zp, has_g_idx=gidx)
    assert ok == stated and (why is None) == stated


@pytest.mark.parametrize("is_cuda,cc,refused", [
    (True, (9, 0), None), (True, (8, 0), None), (True, (8, 9), None), (True, (10, 0), None), (True, None, None),
    (True, (7, 5), "sm_75, below the sm_80"), (True, (7, 0), "sm_70"), (False, None, "not CUDA"),
    (False, (9, 0), "not CUDA"),
])
def test_platform_refusal(is_cuda, cc, refused):
    """vLLM skips a kernel whose minimum capability the GPU lacks without asking it, so register() must say so
    itself: refused below sm_80 and off CUDA, with the reason; an unknown capability is not refused."""
    why = plugin.platform_refusal(is_cuda, cc)
    assert (why is None) == (refused is None) and (refused is None or refused in why), why


# ---------------------------------------------------------------------------------------------- op signatures

def _schema_args(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments]


@pytest.mark.parametrize("mode,backend,icc,env,hint", [
    (0, "", None, {}, False),                                             # --enforce-eager: nothing to say
    (3, "eager", None, {}, False),                                        # no Inductor
    (3, "", None, {}, True),                                              # vLLM's default: Inductor, default mode
    (3, "inductor", {"combo_kernels": False}, {}, True),                  # combo off alone is not enough
    (3, "", None, {"TORCHINDUCTOR_DETERMINISTIC": "1"}, True),           # nor deterministic alone
    (3, "", {"combo_kernels": False, "benchmark_combo_kernel": False},
     {"TORCHINDUCTOR_DETERMINISTIC": "1"}, False),                         # both: what was measured bit-identical
])
def test_inductor_hint(mode, backend, icc, env, hint):
    got = plugin.inductor_hint(mode, backend, icc, env)
    assert (got is not None) == hint
    if hint:
        assert "TORCHINDUCTOR_DETERMINISTIC=1" in got and "combo_kernels" in got and "\n" not in got


def test_exact_op_signature_matches_plugin_call():
    # PdqkitExactLinearKernel.apply_weights calls (x, weight_packed, weight_scale, bias, use_fp32_reduce, sms)
    op = plugin._load_op("exact")
    assert _schema_args(op) == ["x", "weight_packed", "weight_scale", "bias", "use_fp32_reduce", "sms"]
    x = torch.empty(3, 256, dtype=torch.bfloat16, device="meta")
    y = op(x, torch.empty(128, 32, dtype=torch.int32, device="meta"),
           torch.empty(128, 2, dtype=torch.bfloat16, device="meta"), None, True, -1)
    assert y.shape == (3, 128) and y.dtype == torch.bfloat16


def test_fast_op_signature_matches_plugin_call():
    # PdqkitFastLinearKernel.apply_weights calls (x, weight_packed, weight_scale, bias)
    op = plugin._load_op("fast")
    assert _schema_args(op)[:4] == ["x", "weight_packed", "weight_scale", "bias"]
    x = torch.empty(3, 256, dtype=torch.bfloat16, device="meta")
    y = op(x, torch.empty(128, 32, dtype=torch.int32, device="meta"),
           torch.empty(128, 2, dtype=torch.bfloat16, device="meta"), None)
    assert y.shape == (3, 128) and y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- e2e check logic

def _row(tokens, lps):
    return {"tokens": tokens, "logprobs": [[[t, lp, 1], [t + 1, lp - 1.0, 2]] for t, lp in zip(tokens, lps)]}


def test_compare_exact_sees_one_ulp():
    ref = [_row([5, 6, 7], [-0.5, -0.25, -1.0]), _row([8, 9], [-0.125, -2.0])]
    assert e2e.compare_exact(ref, json.loads(json.dumps(ref)))["bit_identical"]
    got = json.loads(json.dumps(ref))
    got[1]["logprobs"][1][1][1] = float(torch.nextafter(torch.tensor(-3.0), torch.tensor(0.0)))  # rank-2 entry
    c = e2e.compare_exact(ref, got)
    assert not c["bit_identical"] and c["tokens_identical"] == 2 and c["logprobs_identical"] == 1
    assert c["first_difference"]["prompt"] == 1 and c["first_difference"]["position"] == 1


def test_compare_fast_divergence_and_deltas():
    ref = [_row([1, 2, 3, 4], [-1.0, -2.0, -3.0, -4.0]), _row([5, 6], [-0.5, -0.5])]
    got = [_row([1, 2, 9, 4], [-1.25, -2.0, -3.0, -4.0]), _row([5, 6], [-0.5, -0.375])]
    c = e2e.compare_fast(ref, got)
    assert c["first_divergence"] == [2, None] and c["identical"] == 1 and c["identical_frac"] == 0.5
    # compared: prompt 0 positions 0, 1 (|d| 0.25, 0); prompt 1 positions 0, 1 (0, 0.125); nothing after divergence
    assert c["positions_compared"] == 4 and c["dlogprob_max"] == 0.25 and c["dlogprob_mean"] == pytest.approx(0.09375)


def test_kernel_use_from_logs():
    log = ("INFO 11-28 [vllm_plugin.py:157] pdqkit: PDQKIT_VLLM_KERNEL=exact, PdqkitExactLinearKernel registered first"
           " for W4A16 (mixed-precision) linear layers\n"
           "INFO 11-28 [compressed_tensors_wNa16.py:137] Using PdqkitExactLinearKernel for CompressedTensorsWNA16\n")
    run = {"kernels_logged": e2e.kernels_in_log(log), "census": {"PdqkitExactLinearKernel": 61},
           "plugin_logged": [list(t) for t in e2e.PLUGIN_LOG_RE.findall(log)]}
    assert e2e.check_kernel_use(run, "exact")["ok"]
    assert not e2e.check_kernel_use(dict(run, census={"PdqkitExactLinearKernel": 60, "MarlinLinearKernel": 1}),
                                    "exact")["ok"]
    assert not e2e.check_kernel_use(run, "fast")["ok"] and not e2e.check_kernel_use(run, "default")["ok"]
    dflt = {"kernels_logged": ["MacheteLinearKernel"], "census": {"MacheteLinearKernel": 61}}
    assert e2e.check_kernel_use(dflt, "default")["ok"]


def test_driver_graph_controls_and_deterministic_inductor(tmp_path, monkeypatch, capsys):
    """The driver without vLLM (engines faked): only graph-det engines get TORCHINDUCTOR_DETERMINISTIC=1 (an inherited
    one is removed elsewhere) and combo kernels off; each graph mode has a second Marlin engine compared with the
    first (the control), beside exact-vs-Marlin; only eager results gate."""
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "1")  # inherited: must not leak into the other engines
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 512}))
    classes = {"marlin": "MarlinLinearKernel", "default": "MacheteLinearKernel", **e2e.PDQKIT_CLASSES}
    seen = {}

    def fake_engine(script, spec, env, log, timeout):
        tag = log.stem
        kernel = env.get("PDQKIT_VLLM_KERNEL") or ("marlin" if "VLLM_DISABLED_KERNELS" in env else "default")
        seen[tag] = (env.get("TORCHINDUCTOR_DETERMINISTIC"), spec["engine"].get("compilation_config"))
        log.write_text(f"{tag}\n")
        rows = [_row([3, 4], [-0.5, -0.25]) for _ in spec["prompts"]]
        if tag == "exact-graph":  # one logprob one ulp off in the last prompt
            rows[-1]["logprobs"][1][0][1] = float(torch.nextafter(torch.tensor(-0.25), torch.tensor(0.0)))
        cls = classes[kernel]
        return {"b1": rows, "batched": rows, "kernels_logged": [cls], "census": {cls: 7},
                "plugin_logged": [[kernel, cls]] if kernel in e2e.PDQKIT_CLASSES else []}

    monkeypatch.setattr(e2e, "run_engine_subprocess", fake_engine)
    rc = e2e.main(["--ckpt", str(ckpt), "--prompts", "3", "--new-tokens", "2", "--max-model-len", "64",
                   "--modes", "eager,graph,graph-det", "--work", str(tmp_path / "work"),
                   "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "vllm_e2e_check.json").read_text())
    graph_tags = [f"{k}-{m}" for m in ("graph", "graph-det") for k in ("marlin", "exact", "fast")]
    graph_tags += ["marlin-graph-control", "marlin-graph-det-control"]
    assert sorted(seen) == sorted(["default-eager", "marlin-eager", "exact-eager", "fast-eager", *graph_tags])
    assert {t for t, (det, _) in seen.items() if det} == {t for t in seen if "graph-det" in t}
    assert all(seen[t][1] is None for t in seen if "graph" not in t)
    assert all(seen[t][1]["cudagraph_capture_sizes"] == [1, 2, 4] for t in graph_tags)
    assert all(("inductor_compile_config" in seen[t][1]) == ("det" in t) for t in graph_tags)
    assert report["marlin"]["graph"]["b1"]["bit_identical"]
    assert report["marlin"]["graph-det"]["batched"]["bit_identical"]
    assert not report["exact"]["graph"]["b1"]["bit_identical"] and report["exact"]["graph-det"]["b1"]["bit_identical"]
    assert rc == 0 and report["passed"], report["gates"]  # graph differences are reported, not gated
    out = capsys.readouterr().out
    assert "marlin graph vs marlin (control)" in out and "marlin graph-det vs marlin (control)" in out


@pytest.mark.parametrize("gpus,inherited,want", [
    (1, "7", {"eager": "7", "graph": "7", "graph-det": "7"}),          # default: the environment as inherited
    (2, None, {"eager": "0", "graph": "1", "graph-det": "0"}),          # by mode, round robin
    (2, "5,3", {"eager": "5", "graph": "3", "graph-det": "5"}),         # an inherited mask is indexed, not escaped
])
def test_driver_spreads_engines_over_gpus_by_mode(tmp_path, monkeypatch, gpus, inherited, want):
    """``--gpus N``: every engine of the i-th mode (Marlin, its control, the pdqkit kernels) on GPU i mod N, so each
    comparison is made on one GPU; GPU j is the j-th entry of an inherited CUDA_VISIBLE_DEVICES."""
    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 512}))
    seen = {}

    def fake_engine(script, spec, env, log, timeout):
        seen[log.stem] = env.get("CUDA_VISIBLE_DEVICES")
        log.write_text("")
        rows = [_row([3], [-0.5]) for _ in spec["prompts"]]
        return {"b1": rows, "batched": rows, "kernels_logged": [], "census": {}, "plugin_logged": []}

    monkeypatch.setattr(e2e, "run_engine_subprocess", fake_engine)
    e2e.main(["--ckpt", str(ckpt), "--prompts", "2", "--new-tokens", "1", "--max-model-len", "64", "--kernels",
              "exact", "--modes", "eager,graph,graph-det", "--gpus", str(gpus), "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "o")])
    assert seen == {t: want[m] for t, m in [("default-eager", "eager"), ("marlin-eager", "eager"),
                                            ("exact-eager", "eager"), ("marlin-graph", "graph"),
                                            ("exact-graph", "graph"), ("marlin-graph-control", "graph"),
                                            ("marlin-graph-det", "graph-det"), ("exact-graph-det", "graph-det"),
                                            ("marlin-graph-det-control", "graph-det")]}


def test_gpus_by_mode_edge_cases():
    runs = [("default-eager", "default", "eager", False), ("marlin-graph", "marlin", "graph", True)]
    assert e2e.gpus_by_mode(runs, ["graph"], 2, None) == {"default-eager": "0", "marlin-graph": "0"}
    assert e2e.gpus_by_mode(runs, ["graph"], 1, "4") == {}
    with pytest.raises(SystemExit, match="names only 1 GPU"):
        e2e.gpus_by_mode(runs, ["graph"], 2, "4")
    with pytest.raises(SystemExit, match="names only 0 GPU"):  # an empty mask hides every GPU: not "unset"
        e2e.gpus_by_mode(runs, ["graph"], 2, "")


def _vllm_checks(tmp_path, **env):
    """Run bench/gpu/vllm_checks.sh with a stub ``python`` first on PATH that only records, per call, the
    CUDA_VISIBLE_DEVICES it saw and its arguments (into ``calls.txt``); results under ``tmp_path``."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "python").write_text(f'#!/bin/sh\necho "${{CUDA_VISIBLE_DEVICES-unset}} $*" >> {tmp_path / "calls.txt"}\n'
                                 f'printf "[%s]" "$@" >> {tmp_path / "argv.txt"}\necho >> {tmp_path / "argv.txt"}\n')
    (stub / "python").chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full.update(OUT=str(tmp_path / "out"), PDQ_CHECKS_DIR=str(tmp_path / "checks"), PDQ_WORK=str(tmp_path / "w"),
                PATH=f"{stub}{os.pathsep}{os.environ['PATH']}", **env)
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(Path(e2e.REPO) / "bench/gpu/vllm_checks.sh")], env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("bad", ["A=x", "A0", "D=1", "A=0,", "A=0;B=1", "A=08"])
def test_vllm_checks_rejects_malformed_lane_gpus(tmp_path, bad):
    """bench/gpu/vllm_checks.sh refuses a malformed LANE_GPUS before it touches anything (no result dir wiped,
    nothing run)."""
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "keep").write_text("")
    r = _vllm_checks(tmp_path, LANE_GPUS=bad, LANES="A")
    assert r.returncode == 2 and f"LANE_GPUS={bad}" in r.stderr, (r.returncode, r.stderr)
    assert (tmp_path / "checks" / "keep").exists() and not (tmp_path / "calls.txt").exists()
    assert not list((tmp_path / "out").iterdir())


def test_vllm_checks_pins_lanes_to_gpus(tmp_path):
    """LANE_GPUS=A=1,C=0 under an inherited CUDA_VISIBLE_DEVICES=5,3: lane A's commands see GPU 3, lane C's GPU 5,
    lane B (not pinned) the inherited mask; an index past the mask is refused before anything runs."""
    r = _vllm_checks(tmp_path, LANE_GPUS="A=1,C=0", LANES="A,B,C", CUDA_VISIBLE_DEVICES="5,3")
    assert r.returncode == 0, r.stderr[-2000:]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    lane_of = {"vllm_e2e_check.py": "3", "vllm_e2e_bench.py": "5", "-m pytest": "5", "pack_vllm_check.py": "5,3",
               "prune_vllm_check.py": "5,3"}
    for key, want in lane_of.items():
        hits = [c for c in calls if key in c]
        assert hits and all(c.split(" ", 1)[0] == want for c in hits), (key, calls)
    assert len(calls) == 6  # A: 1, B: 2, C: gen + two pytest runs
    (tmp_path / "calls.txt").unlink()
    for mask, lanes in (("5,3", "A=2"), ("", "A=0")):  # past the mask; an empty mask (no GPU visible)
        r = _vllm_checks(tmp_path, LANE_GPUS=lanes, LANES="A", CUDA_VISIBLE_DEVICES=mask)
        assert r.returncode == 2 and "is not among" in r.stderr and not (tmp_path / "calls.txt").exists(), r.stderr


@pytest.mark.parametrize("steps", ["pack", "prune", "pack,prune"])
def test_vllm_checks_lane_b_steps_and_a_args(tmp_path, steps):
    """B_STEPS picks lane B's checks (pack with `vllm serve`, prune); A_ARGS reaches lane A's driver; a bad
    B_STEPS is refused before anything runs."""
    r = _vllm_checks(tmp_path, LANES="A,B", B_STEPS=steps, A_ARGS="--parallel 7")
    assert r.returncode == 0, r.stderr[-2000:]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    pack = [c for c in calls if "pack_vllm_check.py" in c]
    prune = [c for c in calls if "prune_vllm_check.py" in c]
    assert (len(pack), len(prune)) == (int("pack" in steps), int("prune" in steps)), calls
    assert all("--serve" in c for c in pack)
    a = [c for c in (tmp_path / "argv.txt").read_text().splitlines() if "vllm_e2e_check.py" in c]
    assert len(a) == 1 and "[--parallel][7][--work]" in a[0], a  # two words, no empty argument
    (tmp_path / "calls.txt").unlink()
    r = _vllm_checks(tmp_path, LANES="A", A_ARGS="")  # unset or empty: no argument at all
    assert r.returncode == 0 and "[eager,graph][--work]" in (tmp_path / "argv.txt").read_text().splitlines()[-1]
    (tmp_path / "calls.txt").unlink()
    r = _vllm_checks(tmp_path, LANES="B", B_STEPS="serve")
    assert r.returncode == 2 and "B_STEPS=serve" in r.stderr and not (tmp_path / "calls.txt").exists()


def test_sigterm_to_the_driver_kills_its_engines(tmp_path):
    """An engine runs in a session of its own; SIGTERM to the driver (``timeout``) must take it down too."""
    import signal
    import textwrap

    engine = tmp_path / "engine.py"  # stands in for the driver script's --_engine mode: writes its pid, then hangs
    engine.write_text(textwrap.dedent("""
        import os, sys, time
        open(sys.argv[0] + ".pid", "w").write(str(os.getpid()))
        time.sleep(600)
    """))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from bench.gpu import vllm_e2e_check as e2e
        e2e.install_engine_reaper()
        log = Path({str(tmp_path / "e.log")!r})
        e2e.run_engine_subprocess(Path({str(engine)!r}), {{}}, {{"PATH": "/usr/bin:/bin"}}, log, 600)
    """))
    d = subprocess.Popen([sys.executable, str(driver)])
    pid_f = Path(str(engine) + ".pid")
    for _ in range(300):
        if pid_f.is_file() and pid_f.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_f.read_text())

    def alive() -> bool:  # a zombie (killed, not yet reaped by init) counts as gone
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    try:
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=30) == 128 + signal.SIGTERM
        for _ in range(100):
            if not alive():
                break
            time.sleep(0.1)
        assert not alive(), "the engine outlived its driver"
    finally:
        if alive():
            os.kill(pid, signal.SIGKILL)


def test_mixed_prompts_deterministic_and_bounded():
    a, b = e2e.mixed_prompts(32, 8192, 959), e2e.mixed_prompts(32, 8192, 959)
    lengths = sorted(map(len, a))
    assert a == b and lengths[0] == 1 and lengths[-1] == 959 and len(set(lengths)) > 20
    assert all(4 <= t < 8192 for p in a for t in p)


# ---------------------------------------------------------------------------------------------- GPU + vLLM

@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_e2e_reduced(tmp_path):
    """Random micro checkpoint (bench.factory + pack.quantize), 8 prompts x 16 tokens, eager engines: exact must be
    bit-identical to Marlin at batch 1 and batched; every engine must use the expected kernel on every layer."""
    cmd = [sys.executable, str(REPO / "bench/gpu/vllm_e2e_check.py"), "--random", "micro", "--prompts", "8",
           "--new-tokens", "16", "--modes", "eager", "--fast-goal", "0", "--max-model-len", "512",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    report_f = tmp_path / "out" / "vllm_e2e_check.json"
    assert report_f.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(report_f.read_text())
    assert report["gates"]["kernel_use"], json.dumps(report["kernel_use"], indent=1)
    assert report["gates"]["exact_eager_bit_identical"], json.dumps(report["exact"], indent=1)[:3000]
    for batch in ("b1", "batched"):  # fast: not bit-exact, but the same model: agreeing tokens, close logprobs
        f = report["fast"]["eager"][batch]
        assert f["positions_compared"] > 0 and f["dlogprob_max"] < 0.1, f
    assert r.returncode == 0, r.stdout[-3000:]


def test_launch_summary_groups_kernels_over_shapes_and_marks_fallbacks():
    """The one-line census summary both vLLM drivers print: calls summed and M ranges merged per kernel over all
    shapes and configs, a dispatcher fallback listed apart from the kernel run by choice."""
    from bench.gpu.vllm_e2e_check import launch_summary

    cen = {"gemv_mma 2560x2048 [gemv_mma bm1 bn2 bk512 w1 st3]": {"calls": 3, "m_min": 1, "m_max": 1},
           "gemv_mma 3072x2560": {"calls": 2, "m_min": 1, "m_max": 2},
           "prefill 2560x2048 [fallback for prefill_wsp bm128 bn128 bk128 w4 st3]": {"calls": 1, "m_min": 300,
                                                                                    "m_max": 300},
           "prefill 2560x2048 [prefill bm32 bn64 bk64 w4 st3]": {"calls": 2, "m_min": 40, "m_max": 70},
           "prefill_wsp 8192x8192 [prefill_wsp bm128 bn128 bk128 w4 st3]": {"calls": 4, "m_min": 128, "m_max": 1024}}
    assert launch_summary(cen) == ("gemv_mma x5 (M 1..2), prefill x2 (M 40..70), prefill (fallback) x1 (M 300..300), "
                                   "prefill_wsp x4 (M 128..1024)")
    assert launch_summary({}) == "-"
