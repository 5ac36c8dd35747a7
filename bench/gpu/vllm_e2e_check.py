"""End-to-end check of pdqkit's vLLM plugin (GPU machine, vLLM 0.26.0): tokens and logprobs vs Marlin.

What it checks, on one pack-quantized checkpoint (written by ``python -m pack.quantize``):

* ``exact`` (``PDQKIT_VLLM_KERNEL=exact``): greedy tokens AND the returned top-5 logprobs are bit-identical to
  the same vLLM run with Marlin forced (``VLLM_DISABLED_KERNELS=CutlassW4A8LinearKernel,MacheteLinearKernel,
  AllSparkLinearKernel``), over ``--prompts`` prompts of mixed length, one prompt at a time (batch 1) and all at
  once (batched), with ``enforce_eager=True`` (the gate). With ``--modes eager,graph`` the same comparison with
  torch.compile + CUDA graphs is reported separately (not a gate: compiled graphs are not guaranteed to be
  reproducible between engines, see shared/gpu/README.md). In graph mode a second Marlin engine is the control:
  ``marlin graph vs marlin (control)`` says whether two engines with the same kernel agree at all, which any
  exact-vs-Marlin difference in graph mode is read against. Mode ``graph-det`` is graph mode with Inductor's
  deterministic mode (``TORCHINDUCTOR_DETERMINISTIC=1``: no on-device timing of choices that change numerics;
  combo kernels off, whose benchmarking that mode refuses), with its own control.
* ``fast`` (``PDQKIT_VLLM_KERNEL=fast``): per prompt the first position where its greedy tokens leave Marlin's
  (over ``--new-tokens``), and the mean / max |Δ logprob| of the tokens both runs chose before that point;
  goal: >= ``--fast-goal`` (90 %) of the prompts identical.
* the kernel really used: every engine's log must name the expected class in vLLM's ``Using X for
  CompressedTensorsWNA16`` line (default run: vLLM's own choice, no pdqkit class; Marlin run: Marlin; pdqkit runs:
  only the pdqkit class, and the plugin's own "registered first" line), and a census of every
  ``CompressedTensorsWNA16`` layer of the loaded model (``LLM.apply_model``) must show that class on all of them.

* which of pdqkit's kernels ran (not a gate): pdqkit engines run with the launch census on
  (``PDQKIT_W4A16_CENSUS=1``, :func:`kernels.w4a16.census`), reported per engine for the start-up, the batch-1 and
  the batched generate calls (kernel, calls, M range; a Gluon or inline-PTX config that fell back is marked).
  ``--fast-table FILE`` gives the fast engines a tuned table of their own (``PDQKIT_W4A16_TABLE``), e.g. one that
  routes this model's prefill shapes to ``prefill_wsp``.

Each engine runs in its own subprocess (one engine per process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), several at
once (``--parallel``; small engines share the GPU through ``kv_cache_memory_bytes``). The plugin is found the way
vLLM finds any plugin, through the ``vllm.general_plugins`` entry point: when pdqkit is not pip-installed, a
``pdqkit.dist-info`` carrying the entry points declared in pyproject.toml is put on the engines' PYTHONPATH.

Usage (repo root, vLLM importable, e.g. ``export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0``)::

    python bench/gpu/vllm_e2e_check.py --ckpt /path/to/w4a16            # an existing pack-quantized checkpoint
    python bench/gpu/vllm_e2e_check.py --random small                     # random 'small' model + pack.quantize
    python bench/gpu/vllm_e2e_check.py --random micro --prompts 8 --new-tokens 16 --modes eager   # quick
    python bench/gpu/vllm_e2e_check.py --random small --kernels exact --modes graph,graph-det --gpus 2 --parallel 7

``--gpus N`` spreads the engines over N GPUs by mode: every engine of the i-th mode in ``--modes`` (Marlin, its
control and the pdqkit kernels) runs on GPU i mod N, so each comparison is made on one GPU and the modes compile
and run beside fewer neighbours. GPU j is the j-th entry of an inherited CUDA_VISIBLE_DEVICES (else device j).
On two H200s (2026-11-29) ``exact`` was bit-identical to Marlin in ``graph-det`` (on another GPU than Marlin's)
and not in ``graph``, where the Marlin control agreed (kernels/README.md, vLLM plugin section).

Prints a compact table; writes ``vllm_e2e_check.json`` (and the engine logs) to ``--out`` (default ``$OUT``).
Exit status 0 when every gate passed (exact bit-identity in eager mode, kernel logs/census, fast goal).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kernels.vllm_plugin import (  # noqa: E402  (after the sys.path line; imports no vLLM or Triton)
    DETERMINISTIC_INDUCTOR_CONFIG, DETERMINISTIC_INDUCTOR_ENV, KERNEL_CLASS_NAMES as PDQKIT_CLASSES)

MARLIN_ONLY = "CutlassW4A8LinearKernel,MacheteLinearKernel,AllSparkLinearKernel"
MODES = ("eager", "graph", "graph-det")  # graph: vLLM's default torch.compile + CUDA graphs
KERNEL_LOG_RE = re.compile(r"Using (\w+) for CompressedTensorsWNA16")
PLUGIN_LOG_RE = re.compile(r"pdqkit: PDQKIT_VLLM_KERNEL=(\w+), (\w+) registered first")
TOPK = 5
# env vars that select kernels: never inherited by an engine from the caller's shell
_KERNEL_ENV = ("PDQKIT_VLLM_KERNEL", "VLLM_DISABLED_KERNELS", "VLLM_MARLIN_USE_ATOMIC_ADD", "VLLM_MARLIN_INPUT_DTYPE",
               "PDQKIT_W4A16_TABLE", "PDQKIT_W4A16_CENSUS")


# ----------------------------------------------------------------------------------------------------------------
# shared with bench/vllm_e2e_bench.py and tests/test_vllm_plugin.py: entry-point shim, engine env, engine kwargs
# ----------------------------------------------------------------------------------------------------------------

def pyproject_entry_points(pyproject: Path = REPO / "pyproject.toml") -> dict[str, dict[str, str]]:
    """``{group: {name: "module:attr"}}`` declared under ``[project.entry-points.*]`` in pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads(Path(pyproject).read_text())
    return {g: dict(eps) for g, eps in data.get("project", {}).get("entry-points", {}).items()}


def write_entry_point_shim(dest: Path, pyproject: Path = REPO / "pyproject.toml") -> Path:
    """Write ``dest/pdqkit-<version>.dist-info`` (METADATA + entry_points.txt from pyproject.toml) so that
    ``importlib.metadata.entry_points(group="vllm.general_plugins")`` finds pdqkit's plugin with ``dest`` on
    sys.path, exactly as it would after ``pip install pdqkit``. Returns ``dest``."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    eps = pyproject_entry_points(pyproject)
    if "vllm.general_plugins" not in eps:
        raise RuntimeError(f"{pyproject}: no [project.entry-points.\"vllm.general_plugins\"] section")
    dest = Path(dest)
    info = dest / f"{project['name']}-{project['version']}.dist-info"
    if info.exists():
        shutil.rmtree(info)
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, items in eps.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in items.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return dest


def plugin_installed() -> bool:
    """Whether an installed pdqkit distribution already declares the vLLM plugin (then no shim is needed)."""
    from importlib.metadata import entry_points

    return any(ep.value == "kernels.vllm_plugin:register" for ep in entry_points(group="vllm.general_plugins"))


_SHIM_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _plugin_paths(work: Path) -> tuple[str, ...]:
    # the repo (for `kernels`, `pack`, `bench`), and the entry-point shim unless pdqkit is pip-installed
    if plugin_installed():
        return (str(REPO),)
    return (str(write_entry_point_shim(work / "entry_points")), str(REPO))


def plugin_pythonpath(work: Path) -> list[str]:
    """PYTHONPATH entries that let a vLLM process in ``work`` find and import pdqkit's plugin."""
    with _SHIM_LOCK:  # engines are launched from several threads
        return list(_plugin_paths(Path(work)))


def _with_plugin_path(work: Path, pythonpath: str) -> str:
    """``pythonpath`` with the entries that make pdqkit's plugin findable (:func:`plugin_pythonpath`) in front."""
    return os.pathsep.join([*plugin_pythonpath(work), *(p for p in pythonpath.split(os.pathsep) if p)])


def scrubbed_environ() -> dict[str, str]:
    """This process's environment without anything that picks or changes a W4A16 kernel or Inductor's numerics
    (``_KERNEL_ENV`` and ``TORCHINDUCTOR_DETERMINISTIC``): the base of every engine's environment."""
    drop = {*_KERNEL_ENV, DETERMINISTIC_INDUCTOR_ENV[0]}
    return {k: v for k, v in os.environ.items() if k not in drop}


def kernel_env(kernel: str, work: Path, pythonpath: str = "") -> dict[str, str]:
    """The variables that make a vLLM process choose ``kernel``: ``default`` (vLLM's choice: none), ``marlin``
    (Marlin forced), ``fast`` / ``exact`` (pdqkit's plugin: its PYTHONPATH in front of ``pythonpath``, and
    ``PDQKIT_VLLM_KERNEL``)."""
    if kernel == "default":
        return {}
    if kernel == "marlin":
        return {"VLLM_DISABLED_KERNELS": MARLIN_ONLY}
    if kernel not in PDQKIT_CLASSES:
        raise ValueError(f"unknown kernel {kernel!r}: default, marlin, fast or exact")
    return {"PDQKIT_VLLM_KERNEL": kernel, "PYTHONPATH": _with_plugin_path(work, pythonpath)}


def engine_env(kernel: str, work: Path, tag: str, deterministic_inductor: bool = False,
               table: Path | None = None) -> dict[str, str]:
    """Environment of one engine subprocess. ``kernel``: ``default`` (vLLM's choice), ``marlin`` (Marlin forced),
    ``fast`` / ``exact`` (pdqkit plugin: with the launch census on, ``kernels.w4a16.census``). In-process engine,
    own torch.compile cache dir per run tag.
    ``deterministic_inductor``: ``TORCHINDUCTOR_DETERMINISTIC=1`` (Inductor times no choice that changes numerics,
    e.g. a compiled reduction's order, which could otherwise differ from one engine to the next); removed if
    inherited and not asked for. ``table``: a tuned table for pdqkit's fast kernel (``PDQKIT_W4A16_TABLE``) instead
    of the packaged one; never inherited."""
    env = scrubbed_environ()
    # the plugin's path on every engine (a default or Marlin engine just does not select it)
    env["PYTHONPATH"] = _with_plugin_path(work, env.get("PYTHONPATH", ""))
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1",
               VLLM_CACHE_ROOT=str(work / "vllm_cache" / tag), TOKENIZERS_PARALLELISM="false")
    if deterministic_inductor:
        var, value = DETERMINISTIC_INDUCTOR_ENV
        env[var] = value
    env.update({k: v for k, v in kernel_env(kernel, work).items() if k != "PYTHONPATH"})
    if kernel in PDQKIT_CLASSES:
        env["PDQKIT_W4A16_CENSUS"] = "1"
        if table is not None:
            env["PDQKIT_W4A16_TABLE"] = str(Path(table).absolute())
    return env


def gemma4_head_dim_fix(cfg):
    """hf_overrides callable for Gemma-4 configs under transformers >= 5.14 (shared/gpu/README.md)."""
    tc = getattr(cfg, "text_config", cfg)
    try:
        dims = [tc.per_layer_config[i].head_dim for i in range(tc.num_hidden_layers)]
        tc.allow_global_per_layer_attribute_access = True
        tc.global_head_dim = max(dims)
    except Exception:  # noqa: BLE001 - vLLM first calls it on a dummy config without layers
        pass
    return cfg


def engine_kwargs(ckpt: Path, **overrides) -> dict:
    """``LLM(**kwargs)`` for a pdqkit checkpoint: the checkpoint's ``vllm_config.yaml`` (what ``vllm serve OUT
    --config OUT/vllm_config.yaml`` uses) when present, else bf16 + TRITON_ATTN + the head-dim callable; then
    ``overrides``. Token-id prompts only (``skip_tokenizer_init``)."""
    kw = {"dtype": "bfloat16", "attention_backend": "TRITON_ATTN"}
    yml = Path(ckpt) / "vllm_config.yaml"
    if yml.is_file():
        import yaml

        kw.update({k.replace("-", "_"): v for k, v in (yaml.safe_load(yml.read_text()) or {}).items()})
    else:
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        if "text_config" in cfg:
            kw["language_model_only"] = True
    kw.setdefault("hf_overrides", gemma4_head_dim_fix)
    kw.update(model=str(ckpt), skip_tokenizer_init=True, seed=0)
    kw.update(overrides)
    return kw


def text_config_of(ckpt: Path) -> dict:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def mixed_prompts(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts, lengths spread log-uniformly over [1, max_len] (shuffled), ids in [4, vocab)
    (ids 0..3 are pad/eos/bos/unk in pdqkit's tokenizers). Deterministic in ``seed``."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(L)] for L in _mixed_lengths(n, max_len, rng)]


def _mixed_lengths(n: int, max_len: int, rng: random.Random) -> list[int]:
    """``n`` prompt lengths spread log-uniformly over [1, max_len], shuffled by ``rng``."""
    lengths = [max(1, round(max_len ** (i / max(1, n - 1)))) for i in range(n)]
    rng.shuffle(lengths)
    return lengths


def text_prompts(ckpt: Path, n: int, max_len: int, seed: int = 0, split: str = "valid") -> list[list[int]]:
    """``n`` prompts cut from the evaluation bed's ``split`` text, tokenized with the checkpoint's own tokenizer
    (``AutoTokenizer``): lengths spread log-uniformly over [1, max_len] (shuffled as in :func:`mixed_prompts`),
    start positions spread evenly over the split. For trained checkpoints, whose greedy continuations of real text
    have real logit margins (random token ids make a trained model's next-token choice nearly a tie)."""
    import numpy as np
    from transformers import AutoTokenizer

    from bench.corpus import token_stream

    stream = token_stream(split, AutoTokenizer.from_pretrained(ckpt))
    lengths = _mixed_lengths(n, max_len, random.Random(seed))
    starts = np.linspace(0, len(stream) - max_len, n).astype(np.int64)
    return [stream[s:s + L].astype(np.int64).tolist() for s, L in zip(starts, lengths)]


def wna16_census(model) -> dict[str, int]:
    """``{kernel class name: number of CompressedTensorsWNA16 layers}`` of a loaded vLLM model (apply_model)."""
    counts: dict[str, int] = {}
    for _, m in model.named_modules():
        scheme = getattr(m, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is not None and type(scheme).__name__ == "CompressedTensorsWNA16":
            counts[type(kernel).__name__] = counts.get(type(kernel).__name__, 0) + 1
    return counts


def kernels_in_log(text: str) -> list[str]:
    """Kernel classes named in vLLM's ``Using X for CompressedTensorsWNA16`` lines, in order, without repeats."""
    return list(dict.fromkeys(KERNEL_LOG_RE.findall(text)))


_LIVE_ENGINES: set[int] = set()  # process groups of the engines running now (each in its own session)
_LIVE_LOCK = threading.RLock()  # re-entrant: the handler may interrupt the main thread holding it


def kill_live_engines(signum=None, frame=None) -> None:
    """SIGKILL every running engine's process group; as a signal handler (SIGTERM, e.g. from ``timeout``), then
    exit: an engine lives in a session of its own, so without this it would outlive its driver (GPU memory held,
    logs still being written)."""
    with _LIVE_LOCK:
        groups = list(_LIVE_ENGINES)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if signum is not None:
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def tracked_engine(pgid: int):
    """Within the block, the process group ``pgid`` (a subprocess started with ``start_new_session=True``) is
    one :func:`kill_live_engines` kills."""
    with _LIVE_LOCK:
        _LIVE_ENGINES.add(pgid)
    try:
        yield
    finally:
        with _LIVE_LOCK:
            _LIVE_ENGINES.discard(pgid)


def install_engine_reaper() -> None:
    """Kill the running engines when this driver gets SIGTERM (main thread only: where signal handlers live)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, kill_live_engines)


def run_engine_subprocess(script: Path, spec: dict, env: dict, log: Path, timeout: float) -> dict:
    """Run ``script --_engine SPEC`` in its own process session; returns its result JSON (or an error dict)."""
    spec_f = log.with_suffix(".spec.json")
    res_f = log.with_suffix(".result.json")
    res_f.unlink(missing_ok=True)
    spec_f.write_text(json.dumps({**spec, "result": str(res_f)}))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, str(script), "--_engine", str(spec_f)], cwd=REPO, env=env,
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        with tracked_engine(p.pid):
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the engine's own process group (it may have spawned helpers)
                p.wait()
                rc = "timeout"
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    out = json.loads(res_f.read_text()) if res_f.is_file() else {"error": f"engine exited {rc}: " + text[-1500:]}
    out.update(rc=rc, wall_s=round(wall, 1), kernels_logged=kernels_in_log(text),
               plugin_logged=[list(t) for t in dict.fromkeys(PLUGIN_LOG_RE.findall(text))])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the engine process
# ----------------------------------------------------------------------------------------------------------------

def _to_lists(outputs) -> list[dict]:
    rows = []
    for o in outputs:
        c = o.outputs[0]
        lps = []
        for pos in c.logprobs or []:
            items = sorted(((int(t), float(lp.logprob), int(lp.rank)) for t, lp in pos.items()),
                           key=lambda r: (r[2], r[0]))
            lps.append([list(r) for r in items])
        rows.append({"tokens": [int(t) for t in c.token_ids], "logprobs": lps})
    return rows


def start_engine(spec: dict):
    """In an engine process: ``(llm, {"startup_s", "census"})`` for ``spec["ckpt"]`` with ``spec["engine"]``."""
    t0 = time.perf_counter()
    from vllm import LLM

    llm = LLM(**engine_kwargs(Path(spec["ckpt"]), **spec["engine"]))
    return llm, {"startup_s": round(time.perf_counter() - t0, 1), "census": llm.apply_model(wna16_census)[0]}


def finish_engine(result: dict, path: str) -> None:
    """Write the engine's result JSON and leave without tearing the in-process engine down (slow; nothing to save)."""
    Path(path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pack_quantize(src: Path, dst: Path, device: str) -> Path:
    """``python -m pack.quantize SRC -o DST --device DEVICE --force`` (the user's command), in a subprocess."""
    cmd = [sys.executable, "-m", "pack.quantize", str(src), "-o", str(dst), "--device", device, "--force",
           "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return dst


def engine_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import SamplingParams

    llm, result = start_engine(spec)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    sp = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], logprobs=TOPK, ignore_eos=True,
                        detokenize=False, seed=0)
    # pdqkit's launch census ({} unless the fast kernel ran with PDQKIT_W4A16_CENSUS=1): what ran in the start-up
    # (profile run, graph capture), then in each generate call
    launches = lambda: (sys.modules["kernels.w4a16"].census(reset=True)  # noqa: E731
                        if "kernels.w4a16" in sys.modules else {})
    result["launches"] = {"startup": launches()}
    t1 = time.perf_counter()
    if spec.get("generate", True):
        result["b1"] = [_to_lists(llm.generate([p], sp, use_tqdm=False))[0] for p in prompts]
        result["launches"]["b1"] = launches()
        result["batched"] = _to_lists(llm.generate(prompts, sp, use_tqdm=False))
        result["launches"]["batched"] = launches()
    result["generate_s"] = round(time.perf_counter() - t1, 1)
    finish_engine(result, spec["result"])


# ----------------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------------

def launch_summary(census: dict) -> str:
    """One line from a :func:`kernels.w4a16.census`: each kernel that ran (a dispatcher fallback marked), its calls
    and M range, over all shapes."""
    ran = {}
    for key, e in census.items():
        name = key.split(" ")[0] + (" (fallback)" if "fallback for" in key else "")
        lo, hi, c = ran.get(name, (e["m_min"], e["m_max"], 0))
        ran[name] = (min(lo, e["m_min"]), max(hi, e["m_max"]), c + e["calls"])
    return ", ".join(f"{n} x{c} (M {lo}..{hi})" for n, (lo, hi, c) in sorted(ran.items())) or "-"


def compare_exact(ref: list[dict], got: list[dict]) -> dict:
    """Bit-identity of tokens and of the top-k logprob lists (token ids, values, ranks) per prompt."""
    tok_same = lp_same = 0
    first_diff = None
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        t = r["tokens"] == g["tokens"]
        lp = t and r["logprobs"] == g["logprobs"]
        tok_same += t
        lp_same += lp
        if not lp and first_diff is None:
            pos = next((j for j, (a, b) in enumerate(zip(r["logprobs"], g["logprobs"])) if a != b), None)
            first_diff = {"prompt": i, "position": pos, "marlin": r["logprobs"][pos] if pos is not None else None,
                          "pdqkit": g["logprobs"][pos] if pos is not None else None}
    n = len(ref)
    return {"prompts": n, "tokens_identical": tok_same, "logprobs_identical": lp_same,
            "bit_identical": tok_same == n and lp_same == n, "first_difference": first_diff}


def compare_fast(ref: list[dict], got: list[dict]) -> dict:
    """First divergence per prompt (None = identical), and |Δ logprob| of the chosen token while tokens agree."""
    firsts, deltas = [], []
    for r, g in zip(ref, got, strict=True):
        first = next((j for j, (a, b) in enumerate(zip(r["tokens"], g["tokens"])) if a != b), None)
        if first is None and len(r["tokens"]) != len(g["tokens"]):
            first = min(len(r["tokens"]), len(g["tokens"]))
        firsts.append(first)
        upto = len(r["tokens"]) if first is None else first
        for j in range(upto):
            tok = r["tokens"][j]
            a = next(lp for t, lp, _ in r["logprobs"][j] if t == tok)
            b = next(lp for t, lp, _ in g["logprobs"][j] if t == tok)
            deltas.append(abs(a - b))
    n = len(ref)
    same = sum(f is None for f in firsts)
    return {"prompts": n, "identical": same, "identical_frac": same / n if n else 0.0, "first_divergence": firsts,
            "dlogprob_mean": sum(deltas) / len(deltas) if deltas else 0.0, "dlogprob_max": max(deltas, default=0.0),
            "positions_compared": len(deltas)}


def check_kernel_use(run: dict, kernel: str) -> dict:
    """Gate on the kernel named in the log and found on every WNA16 layer."""
    logged, census = run.get("kernels_logged", []), run.get("census", {})
    if kernel == "default":
        ok = bool(logged) and not any(k.startswith("Pdqkit") for k in logged) and set(census) == set(logged)
        want = "vLLM's own (no Pdqkit*)"
    else:
        want = "MarlinLinearKernel" if kernel == "marlin" else PDQKIT_CLASSES[kernel]
        ok = logged == [want] and list(census) == [want]
        if kernel in PDQKIT_CLASSES:
            ok = ok and [kernel, want] in run.get("plugin_logged", [])
    return {"ok": bool(ok) and "error" not in run, "expected": want, "logged": logged, "census": census}


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

def build_random_checkpoint(scale: str, work: Path, multimodal: bool) -> Path:
    """bench.factory random ``scale`` model (bf16) -> ``python -m pack.quantize`` -> W4A16 dir (reused if there)."""
    tag = f"random-{scale}{'-mm' if multimodal else ''}"
    bf16, w4 = work / f"{tag}-bf16", work / f"{tag}-w4a16"
    if (w4 / "config.json").is_file():
        return w4
    from bench.factory import save_random_checkpoint

    if not (bf16 / "config.json").is_file():
        print(f"building random {scale} checkpoint at {bf16} ...", flush=True)
        save_random_checkpoint(scale, bf16, multimodal=multimodal, seed=0, force=True)
    import torch

    return pack_quantize(bf16, w4, "cuda" if torch.cuda.is_available() else "cpu")


def _fmt_exact(c: dict | None) -> str:
    if not c:
        return "-"
    verdict = "BIT-IDENTICAL" if c["bit_identical"] else "DIFFERS"
    return f"{verdict} (tokens {c['tokens_identical']}/{c['prompts']}, logprobs {c['logprobs_identical']}/{c['prompts']})"


def _fmt_fast(c: dict | None) -> str:
    if not c:
        return "-"
    return (f"{c['identical']}/{c['prompts']} identical ({100 * c['identical_frac']:.0f}%), "
            f"|dlogprob| mean {c['dlogprob_mean']:.2e} max {c['dlogprob_max']:.2e}")


def gpus_by_mode(runs: list[tuple], modes: list[str], n: int, inherited: str | None) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES per engine tag for ``--gpus n``: the engines of ``modes[i]`` on GPU ``i % n``, where GPU
    j is the j-th entry of ``inherited`` (an existing CUDA_VISIBLE_DEVICES: a mask is narrowed, never escaped) or
    device j. ``runs``: (tag, kernel, mode, generate) tuples. n <= 1: {} (engines inherit the environment)."""
    if n <= 1:
        return {}
    # an empty CUDA_VISIBLE_DEVICES hides every GPU: it is a mask of none, not "unset"
    if inherited is None:
        pool = [str(j) for j in range(n)]
    else:
        pool = [d.strip() for d in inherited.split(",") if d.strip()]
    if len(pool) < n:
        raise SystemExit(f"error: --gpus {n}, but CUDA_VISIBLE_DEVICES={inherited} names only {len(pool)} GPU(s)")
    # the default engine (kernel census only) runs eager also when eager is not among the modes: first GPU
    return {tag: pool[(modes.index(mode) if mode in modes else 0) % n] for tag, _, mode, _ in runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="pack-quantized checkpoint dir (python -m pack.quantize output)")
    src.add_argument("--random", choices=("micro", "small"), help="build a random model of this scale and quantize it")
    ap.add_argument("--multimodal", action="store_true", help="with --random: Gemma4ForConditionalGeneration")
    ap.add_argument("--kernels", default="exact,fast", help="pdqkit kernels to check (default exact,fast)")
    ap.add_argument("--modes", default="eager,graph",
                    help="eager (the gate), graph and/or graph-det (reported; graph-det: deterministic Inductor)")
    ap.add_argument("--no-graph-control", dest="graph_control", action="store_false",
                    help="no second Marlin engine in the graph modes")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--text-prompts", action="store_true",
                    help="prompts cut from the bench corpus' validation text (checkpoint's tokenizer) instead of "
                         "random token ids: for trained checkpoints")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--fast-table", type=Path, help="a tuned table for the fast kernel (PDQKIT_W4A16_TABLE, e.g. "
                    "one that sends prefill to prefill_wsp on this model's shapes) instead of the packaged one")
    ap.add_argument("--fast-goal", type=float, default=0.9, help="fraction of prompts fast must match (default 0.9)")
    ap.add_argument("--parallel", type=int, default=4, help="engines running at once (default 4)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="spread the engines over this many GPUs by mode (the i-th mode's engines on GPU i mod N; "
                         "default 1: all share the visible GPUs)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.08)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=540, help="seconds per engine")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("PDQKIT_E2E_WORK", "/tmp/pdqkit_vllm_e2e")))
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--_engine", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._engine:
        engine_main(args._engine)
        return 0
    if not args.ckpt and not args.random:
        ap.error("pass --ckpt DIR or --random SCALE")
    install_engine_reaper()
    kernels = [k for k in args.kernels.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    if bad := [k for k in kernels if k not in PDQKIT_CLASSES] + [m for m in modes if m not in MODES]:
        ap.error(f"unknown kernel/mode {bad}")
    work = args.work.absolute()
    out = (args.out or work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt.absolute() if args.ckpt else build_random_checkpoint(args.random, work, args.multimodal)
    if not (ckpt / "config.json").is_file():
        print(f"error: {ckpt}: no config.json; pass a checkpoint dir written by python -m pack.quantize",
              file=sys.stderr)
        return 2

    vocab = int(text_config_of(ckpt)["vocab_size"])
    max_prompt = args.max_model_len - args.new_tokens - 1
    prompts = (text_prompts(ckpt, args.prompts, max_prompt) if args.text_prompts
               else mixed_prompts(args.prompts, vocab, max_prompt))
    # graph mode: capture only the decode batch sizes the runs can hit (1, 2, 4, ... up to >= the prompt count)
    sizes = [1]
    while sizes[-1] < args.prompts:
        sizes.append(sizes[-1] * 2)
    base = dict(max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), enable_prefix_caching=False,
                max_num_seqs=max(sizes))
    # (tag, kernel, mode, generate): the default engine only shows which kernel vLLM picks by itself
    runs = [("default-eager", "default", "eager", False)]
    for mode in modes:
        runs += [(f"marlin-{mode}", "marlin", mode, True)] + [(f"{k}-{mode}", k, mode, True) for k in kernels]
        if mode != "eager" and args.graph_control:
            runs.append((f"marlin-{mode}-control", "marlin", mode, True))
    logs = work / "logs"  # one log per engine; $OUT gets them concatenated (it takes few files)
    logs.mkdir(exist_ok=True)

    gpu_of = gpus_by_mode(runs, modes, args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))

    def one(run):
        tag, kernel, mode, gen = run
        eng = dict(base, enforce_eager=(mode == "eager"))
        if mode != "eager":
            eng["compilation_config"] = {"cudagraph_capture_sizes": sizes}
        if mode == "graph-det":
            eng["compilation_config"]["inductor_compile_config"] = dict(DETERMINISTIC_INDUCTOR_CONFIG)
        spec = {"ckpt": str(ckpt), "engine": eng, "prompts": prompts if gen else prompts[:1],
                "new_tokens": args.new_tokens, "generate": gen}
        env = engine_env(kernel, work, tag, deterministic_inductor=mode == "graph-det", table=args.fast_table)
        if tag in gpu_of:
            env["CUDA_VISIBLE_DEVICES"] = gpu_of[tag]
        r = run_engine_subprocess(Path(__file__).resolve(), spec, env, logs / f"{tag}.log", args.timeout)
        status = "error" if "error" in r else "ok"
        where = f" (GPU {gpu_of[tag]})" if tag in gpu_of else ""
        print(f"  [{tag}]{where} {status}: startup {r.get('startup_s', '-')} s, generate {r.get('generate_s', '-')} s, "
              f"kernels {r['kernels_logged']}", flush=True)
        return tag, r

    print(f"checkpoint {ckpt}\n{len(prompts)} prompts (lengths {min(map(len, prompts))}..{max(map(len, prompts))}), "
          f"{args.new_tokens} new tokens, {len(runs)} engines, {args.parallel} at a time", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = dict(pool.map(one, runs))

    report = {"checkpoint": str(ckpt), "prompts": len(prompts), "new_tokens": args.new_tokens,
              "prompt_source": "bench corpus valid text" if args.text_prompts else "random token ids",
              "prompt_lengths": [len(p) for p in prompts], "wall_s": round(time.perf_counter() - t0, 1),
              "fast_table": str(args.fast_table) if args.fast_table else None,
              "kernel_use": {}, "launches": {}, "exact": {}, "fast": {}, "marlin": {}, "gates": {}}
    for tag, kernel, _, _ in runs:
        report["kernel_use"][tag] = check_kernel_use(results[tag], kernel)
        if results[tag].get("launches", {}).get("startup") or results[tag].get("launches", {}).get("b1"):
            report["launches"][tag] = results[tag]["launches"]

    def compare(ref: dict, got: dict, cmp) -> dict:
        if "error" in ref or "error" in got:
            return {"error": ref.get("error") or got.get("error")}
        return {b: cmp(ref[b], got[b]) for b in ("b1", "batched")}

    for mode in modes:
        for k in kernels:
            report[k][mode] = compare(results[f"marlin-{mode}"], results[f"{k}-{mode}"],
                                      compare_exact if k == "exact" else compare_fast)
    for mode in modes:  # two Marlin engines: how far a graph mode itself reproduces
        if f"marlin-{mode}-control" in results:
            report["marlin"][mode] = compare(results[f"marlin-{mode}"], results[f"marlin-{mode}-control"],
                                             compare_exact)

    gates = report["gates"]
    gates["kernel_use"] = all(v["ok"] for v in report["kernel_use"].values())
    if "exact" in kernels and "eager" in modes:
        e = report["exact"]["eager"]
        gates["exact_eager_bit_identical"] = "error" not in e and all(e[b]["bit_identical"] for b in e)
    if "fast" in kernels and "eager" in modes:
        f = report["fast"]["eager"]
        gates["fast_goal"] = "error" not in f and all(f[b]["identical_frac"] >= args.fast_goal for b in f)
    report["passed"] = all(gates.values())

    # ---- table ----
    print(f"\n{'engine':<16} {'kernel used (log / census)':<58} ok")
    for tag, u in report["kernel_use"].items():
        print(f"{tag:<16} {', '.join(u['logged']) or '-':<30} {json.dumps(u['census']):<27} {'yes' if u['ok'] else 'NO'}")
    for tag, phases in report["launches"].items():   # which of pdqkit's kernels ran, per generate call
        for phase in ("b1", "batched"):
            print(f"launches {tag} {phase}: {launch_summary(phases.get(phase, {}))}")
    print(f"\n{'check':<22} {'batch 1':<58} batched")
    for k in [*kernels, "marlin"]:
        for mode in modes:
            if mode not in report[k]:
                continue
            c = report[k][mode]
            fmt = _fmt_fast if k == "fast" else _fmt_exact
            if "error" in c:
                print(f"{k + ' ' + mode:<22} ERROR: {c['error'][:200]}")
                continue
            label = f"{k} {mode} vs marlin" + (" (control)" if k == "marlin" else "")
            print(f"{label:<22} {fmt(c.get('b1')):<58} {fmt(c.get('batched'))}")
    print("\ngates: " + ", ".join(f"{g} {'PASS' if v else 'FAIL'}" for g, v in gates.items()) +
          f"  ->  {'PASSED' if report['passed'] else 'FAILED'}  ({report['wall_s']} s)")
    (out / "vllm_e2e_check.json").write_text(json.dumps(report, indent=1))
    with open(out / "vllm_e2e_check_logs.txt", "w") as fh:
        for tag, _, _, _ in runs:
            fh.write(f"\n===== {tag} =====\n" + (logs / f"{tag}.log").read_text(errors="replace"))
    print(f"wrote {out / 'vllm_e2e_check.json'} and vllm_e2e_check_logs.txt")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
