"""The quality pipeline of the evaluation bed, for the GPU machine: train -> eval -> quantize -> prune -> distill.

Stages (``--stages``, comma-separated, default all; or env ``STAGES``), each optional and skipped with a
reason when its tool is missing:

=========  ==========================================================================================
train      ``python -m bench.train --scale small -o WORK/base --device cuda`` (<= 280 s training loop)
eval       the base against itself + the unigram baseline (ppl of the validation split)
quant      ``python -m pack.quantize WORK/base -o WORK/base-w4a16 --device cuda``; eval (goal: ppl <= +8 %)
prune      ``python -m prune WORK/base -o WORK/pruned-C --ratio 0.2 --criterion C`` per criterion (``C+refit``:
           also ``--refit``, into ``WORK/pruned-C-refit``; ``C+train``: ``--calib`` the train split, the
           teacher's own data, into ``WORK/pruned-C-train``); eval each
distill    ``python -m distill --teacher WORK/base --student WORK/pruned-A -o WORK/distill1 --phase 1``, then
           ``--student WORK/distill1 -o WORK/distill2 --phase 2``; eval each. ``--distill1-lrs A,B`` (and/or
           ``--distill1-hidden-weights``): phase 1 once per combination, the lowest training forward KL
           wins; ``--distill1-variants "NAME=ARGS;..."``: phase 1 once per set of extra distill args (each
           sized by the budget with its own batch); ``--distill1-select 2,all``: one more variant per pool
           multiple, trained on the highest teacher-student KL windows (``python -m distill.select``) of a
           pool of M x its tokens; ``--token-budget-pct P``: phase 1's steps chosen so both
           phases use P % of the teacher's training tokens; ``--phase1-only``: no phase 2; ``--parallel N``: up
           to N phase-1 runs at once (the small pair leaves the GPU mostly idle), evaluated afterwards;
           ``--distill2-from NAME``: phase 2 continues from that variant whatever its training KL;
           ``--distill2-also A,B``: phase 2 also from those variants (rows ``distill2-from-A``, not quantized)
final      ``python -m pack.quantize`` of the last distilled (else pruned) checkpoint; eval
scratch    (only when named) the pruned width trained from scratch with ``--train-args``
           (``bench.train --mlp-width W`` into WORK/scratch-mlpW); eval — the control for the distill goal
=========  ==========================================================================================

Every checkpoint is evaluated by :func:`bench.eval.evaluate` against the bf16 base as teacher (ppl, KL,
top1, greedy agreement), on all validation tokens; ``--overlap-ngrams 8,32`` also on the targets seen in the
train split as N-grams and on the novel ones (``goals.ppl_ratio_by_subset``). Numbers go to ``$OUT/quality.json``,
rewritten after every stage (a run cut short keeps what it measured; a copy in ``--work`` carries them to the next call on the
same warm machine, so call 2's quality.json holds both calls' numbers), and a table is printed at the end. Checkpoints stay in
``--work`` (default /tmp/pdq-quality: outside the repo, kept while the GPU machine stays warm) — they cannot
come back from the device; only ``$OUT`` files do (quality.json, pipeline.log, train_log.json).

One ``run`` call may last 10 minutes, so split the work (same warm machine, ``--work`` persists)::

    # call 1 (~7 min): corpus + tokenizer build, train small, eval, quantize
    python bench/gpu/quality_pipeline.py --stages train,eval,quant
    # call 2: the other stages on the same base
    python bench/gpu/quality_pipeline.py --stages prune,distill,final

``--deadline S`` (default 570) skips stages that would start after S seconds of this call and bounds each
tool run, so the JSON is always written before the call's limit. Each tool runs as its own process, by default
forked from one forkserver that imported torch and transformers once (``--launch fork``, bench/toolrun.py: ~10 s
less per tool on the H200 machine, the same bytes); ``--launch exec`` starts a fresh ``python -m`` instead.
Extra arguments per tool: ``--train-args``, ``--prune-args``, ``--distill1-args``, ``--distill2-args``
(shell-quoted strings).
CPU smoke run of every stage (about 20 s on two cores; without the small prune and distill arguments, every
criterion prunes at prune's default calibration and the deadline cuts the run before distill)::

    --scale micro --device cpu --train-args "--steps 20" --eval-tokens 1024 --criteria activation \
        "--prune-args=--samples 8 --seq-len 128" --distill1-args "--steps 2 --batch 2 --seq-len 128" \
        --distill2-args "--steps 2 --batch 2 --seq-len 128 --max-new-tokens 16"
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.toolrun import ToolRunner, run_exec  # noqa: E402  (stdlib only: no torch import at startup)

STAGES = ("train", "eval", "quant", "prune", "distill", "final", "scratch")
DEFAULT_STAGES = STAGES[:-1]  # scratch (a second training run) only when asked for
QUANT_GOAL_PCT = 8.0


class Pipeline:
    def __init__(self, args):
        self.a = args
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.log_f = open(self.out / "pipeline.log", "a")
        # numbers of earlier calls on this warm machine live on in WORK/quality.json (OUT is new each call)
        qf = next((f for f in (self.out / "quality.json", self.work / "quality.json") if f.is_file()), None)
        self.q = json.loads(qf.read_text()) if qf else {
            "schema": "pdqkit_bench_quality/1", "stages": {}, "rows": {}, "goals": {}}
        self.base = Path(args.base) if args.base else self.work / "base"
        self._teacher = None
        self._this_call: set[str] = set()  # stages recorded by this call (a new base drops the others)
        # --parallel: phase-1 runs in threads (each a subprocess); log, quality.json and self.q under this lock
        self._lock = threading.RLock()
        # --launch fork: tools run as forks of one interpreter that imported torch + transformers once (saves their
        # 4-10 s of imports per tool, on CI's CPU and on the H200 machine alike); --launch exec: a fresh one each
        self.tools = ToolRunner() if args.launch == "fork" else None

    # ---------------------------------------------------------------------------------------- plumbing
    def log(self, msg: str) -> None:
        with self._lock:
            line = f"[{time.time() - self.t0:6.1f}s] {msg}"
            print(line, flush=True)
            self.log_f.write(line + "\n")
            self.log_f.flush()

    def left(self) -> float:
        return self.a.deadline - (time.time() - self.t0)

    def save(self) -> None:
        from bench.cache import write_json_atomic

        with self._lock:
            write_json_atomic(self.q, self.out / "quality.json")
            write_json_atomic(self.q, self.work / "quality.json")

    def stage(self, name: str, status: str, **info) -> None:
        with self._lock:
            self.q["stages"][name] = {"status": status, **info}
            self._this_call.add(name)
            self.log(f"stage {name}: {status} {json.dumps(info, sort_keys=True) if info else ''}")
            self.save()

    def run(self, name: str, cmd: list[str], min_s: float = 30) -> bool:
        """Run a tool; its output goes to pipeline.log. False (stage marked failed/skipped) on error."""
        budget = self.left()
        if budget < min_s:
            self.stage(name, "skipped", reason=f"deadline: {budget:.0f}s left, needs >= {min_s:.0f}s")
            return False
        self.log("$ " + shlex.join(cmd))
        t = time.time()
        launch = self.tools.run if self.tools is not None else run_exec  # --launch fork / exec (bench/toolrun.py)
        r = launch(cmd, cwd=REPO, timeout=budget - 10)
        rc, out, timed_out = r.returncode, r.output, r.timed_out
        if timed_out:
            with self._lock:
                self.log_f.write(f"--- {name} ---\n" + out[-20000:] + "\n")
            self.stage(name, "failed", reason="timeout (deadline)", seconds=round(time.time() - t, 1))
            return False
        with self._lock:  # a tool's whole output in one piece, also when runs go in parallel
            self.log_f.write(f"--- {name} ---\n" + out[-50000:] + "\n")
        tail = "\n".join(out.strip().splitlines()[-3:])
        if rc != 0:
            self.stage(name, "failed", rc=rc, seconds=round(time.time() - t, 1), tail=tail[-1500:])
            return False
        self.stage(name, "ok", seconds=round(time.time() - t, 1), tail=tail[-600:])
        return True

    def evaluate(self, label: str, ckpt: Path) -> dict | None:
        """Evaluate ``ckpt`` against the base (teacher); store its row under ``label``."""
        from bench.eval import evaluate

        if not (ckpt / "config.json").is_file():
            self.log(f"eval {label}: {ckpt} missing, skipped")
            return None
        if self.left() < 20:
            self.log(f"eval {label}: deadline, skipped")
            return None
        want_unigram = "unigram_ppl" not in self.q
        rep = evaluate([ckpt], teacher=self.base, device=self.a.device, max_tokens=self.a.eval_tokens or None,
                       prompts=self.a.prompts, new_tokens=self.a.new_tokens, unigram=want_unigram,
                       log=self.log, overlap_ngrams=self.a.overlap_ngrams)
        row = rep["rows"][0]
        row["label"] = label
        self.q["rows"][label] = row
        for k in ("corpus_sha256", "tokenizer_sha256", "seq_len", "windows", "new_tokens", "prompts",
                  "overlap_ngrams", "subset_fraction"):
            if k in rep:
                self.q.setdefault("eval", {})[k] = rep[k]
        if want_unigram:
            self.q["unigram_ppl"] = rep["unigram_ppl"]
        self.log(f"eval {label}: ppl {row['ppl']:.3f}  KL {row['kl']:.4f}  top1 {row['top1']:.3f}  "
                 f"greedy {'-' if row['greedy'] is None else format(row['greedy'], '.3f')}  ({row['tokens']} tokens, "
                 f"{row['seconds']:.1f}s)")
        self.goals()
        self.save()
        return row

    def goals(self) -> None:
        rows, g = self.q["rows"], self.q["goals"]
        base = rows.get("base")
        if base is None:
            return
        g["base_vs_unigram"] = {"ppl": base["ppl"], "unigram_ppl": self.q.get("unigram_ppl")}
        if "base-w4a16" in rows:
            pct = 100 * (rows["base-w4a16"]["ppl"] / base["ppl"] - 1)
            g["quant_ppl_change_pct"] = {"value": pct, "goal": f"<= +{QUANT_GOAL_PCT}%", "met": pct <= QUANT_GOAL_PCT}
        pruned = {k: v for k, v in rows.items() if k.startswith("pruned-")}
        if pruned:
            g["prune_ppl_change_pct"] = {k: 100 * (v["ppl"] / base["ppl"] - 1) for k, v in pruned.items()}
        src = rows.get(f"pruned-{_prune_name(self.a.distill_from)}")
        for d in ("distill1", "distill2"):
            if d in rows and src is not None and src["ppl"] > base["ppl"]:
                # fraction of the pruning damage (ppl gap to the base) that distillation won back
                g[f"{d}_recovered"] = (src["ppl"] - rows[d]["ppl"]) / (src["ppl"] - base["ppl"])
        # the distill goal's measure (teacher ppl / student ppl >= 0.99) for every row, and the cross-entropy
        # ratio (teacher nll / student nll) beside it
        others = {k: v for k, v in rows.items() if k != "base"}
        g["ppl_ratio"] = {k: base["ppl"] / v["ppl"] for k, v in others.items()}
        if base.get("nll") and all(v.get("nll") for v in others.values()):
            g["ce_ratio"] = {k: base["nll"] / v["nll"] for k, v in others.items()}
        if base.get("subsets"):  # --overlap-ngrams: the same ratio on targets seen in train / novel ones
            g["ppl_ratio_by_subset"] = {
                name: {k: d["ppl"] / v["subsets"][name]["ppl"] for k, v in others.items()
                       if (v.get("subsets") or {}).get(name, {}).get("ppl")}
                for name, d in base["subsets"].items() if d.get("ppl")}
        last = "distill2" if "distill2" in rows else "distill1" if "distill1" in rows else None
        if last and f"{last}-w4a16" in rows:
            g["final_quant_ppl_change_pct"] = 100 * (rows[f"{last}-w4a16"]["ppl"] / rows[last]["ppl"] - 1)

    # ---------------------------------------------------------------------------------------- stages
    def _train(self, name: str, dst: Path, *extra: str, last: tuple[str, ...] = ()) -> bool:
        """``bench.train`` at ``--scale`` into ``dst`` with ``extra``, ``--train-args`` and ``last`` (which win over
        ``--train-args``) (stage ``name``)."""
        cmd = [sys.executable, "-m", "bench.train", "--scale", self.a.scale, "-o", str(dst), "--force",
               "--device", self.a.device, *extra, *shlex.split(self.a.train_args), *last]
        return self.run(name, cmd, min_s=120 if self.a.scale == "small" else 10)

    def s_train(self):
        if self.a.base:
            self.stage("train", "skipped", reason=f"--base {self.a.base} given")
            return
        if self._train("train", self.base, "--log-json", str(self.out / "train_log.json")):
            self._forget_old_base("a new base was trained")
            log = json.loads((self.base / "train_log.json").read_text())
            self.q["train"] = {k: log[k] for k in ("steps", "steps_planned", "tokens_seen", "train_seconds",
                                                   "tokens_per_s", "params", "final", "device_name", "config")}
            self.q["train"]["valid_curve"] = log["valid_curve"]
            self.save()

    def _forget_old_base(self, why: str) -> None:
        """Everything an earlier call on this machine left in WORK described the old base: its rows, goals, eval
        metadata (subset split), distill budget and selection, stage records and the checkpoints built from it
        (``pruned-*``, ``distill1*``, ``distill2*``, ``scratch-*``, ``*-w4a16``), which later stages would
        otherwise pick up (``distill`` starts from ``pruned-*``, ``final`` quantizes ``distill2``). Drop them."""
        self.q["rows"], self.q["goals"] = {}, {}
        for k in ("train", "unigram_ppl", "eval", "distill_budget", "distill_budget_per_run", "distill1_selection",
                  "distill1_data_selection"):
            self.q.pop(k, None)  # ("train" is written again by s_train when this call trained the base)
        self.q["stages"] = {k: v for k, v in self.q["stages"].items() if k in self._this_call}
        dropped = []
        for p in sorted(self.work.iterdir()):
            if p.name.startswith(("pruned-", "distill1", "distill2", "scratch-")) or p.name.endswith("-w4a16"):
                if p.is_symlink() or not p.is_dir():
                    p.unlink()
                else:
                    shutil.rmtree(p)
                dropped.append(p.name)
        self.log(f"{why}: earlier calls' rows and checkpoints dropped ({', '.join(dropped) or 'no checkpoints'})")
        self.save()

    def s_eval(self):
        self.evaluate("base", self.base)

    def s_scratch(self):
        """Control for the distillation goal: the pruned student's architecture (MLP width kept by ``--ratio``)
        trained from scratch with the teacher's own recipe (``--train-args``, same data; when a time budget cut the
        teacher's run, the steps and warm-up it actually ran, from its lineage, with no time budget, so the faster
        narrow model does not get more), evaluated like every row (``scratch-mlpW``): what this width reaches with
        100 % of the teacher's tokens."""
        from pack.checkpoint import read_lineage
        from prune.config import kept_width

        cfg = json.loads((self.base / "config.json").read_text())
        width = kept_width(cfg.get("text_config", cfg)["intermediate_size"], self.a.ratio)
        name = f"scratch-mlp{width}"
        dst = self.work / name
        recipe = next((s for s in read_lineage(self.base) if s.get("kind") == "base"), {}).get("recipe", {})
        cut = "steps" in recipe and recipe.get("steps_planned", recipe["steps"]) != recipe["steps"]
        pin = ("--steps", str(recipe["steps"]), "--warmup", str(recipe["warmup"]), "--time-budget", "0") if cut else ()
        if self._train(name, dst, "--mlp-width", str(width), "--no-unigram", last=pin):
            self.evaluate(name, dst)

    def _quantize(self, src: Path, label: str, name: str | None = None):
        """``pack.quantize`` ``src`` into WORK/``name`` (default ``<src name>-w4a16``), evaluated as row ``name``."""
        if not _have("pack.quantize"):
            self.stage(label, "skipped", reason="pack.quantize not available")
            return
        name = name or f"{src.name}-w4a16"
        dst = self.work / name
        if self.run(label, [sys.executable, "-m", "pack.quantize", str(src), "-o", str(dst), "--device",
                            self.a.device, "--force", "--no-progress"], min_s=30):
            self.evaluate(name, dst)

    def s_quant(self):
        self._quantize(self.base, "quant", "base-w4a16")   # the row goals() and the table read, whatever --base is

    def s_prune(self):
        if not _have("prune.__main__"):
            self.stage("prune", "skipped", reason="prune not available")
            return
        crit = self.a.criteria.split(",") if self.a.criteria else list(_prune_criteria())
        for entry in crit:
            c, opts = _prune_entry(entry)
            name = _prune_name(entry)
            dst = self.work / f"pruned-{name}"
            extra = ["--refit"] if "refit" in opts else []
            if "train" in opts:
                extra += ["--calib", "bench:train"]
            if self.run(f"prune-{name}", [sys.executable, "-m", "prune", str(self.base), "-o", str(dst), "--ratio",
                                          str(self.a.ratio), "--criterion", c, "--device", self.a.device, "--force",
                                          "--no-progress", *extra, *shlex.split(self.a.prune_args)], min_s=30):
                if name == _prune_name(self.a.distill_from):
                    self._drop_distilled(f"a new pruned-{name}")
                self.evaluate(f"pruned-{name}", dst)

    def _distill_cmd(self, phase: int, src: Path, dst: Path, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "distill", "--teacher", str(self.base), "--student", str(src), "-o", str(dst),
                "--phase", str(phase), "--device", self.a.device, "--force", *extra]

    def _token_budget(self, extra1: list[str], extra2: list[str], run: str = "") -> list[str]:
        """With ``--token-budget-pct P``: the phase-1 ``--steps`` that keep phase 1 + phase 2 within P % of the
        tokens the teacher was trained on (its lineage's ``tokens_seen``); recorded in quality.json (per phase-1
        variant ``run`` when given). A variant that sets its own ``--steps`` keeps them; its tokens are recorded
        against the budget all the same (``steps_given``)."""
        from pack.checkpoint import read_lineage

        a1, p1 = _distill_args(1, extra1)
        own = a1.steps is not None  # a variant that sets its own --steps keeps them (recorded against the budget)
        if own and not run:
            raise ValueError("--token-budget-pct sets phase 1's --steps: do not also pass it in --distill1-args")
        teacher = next((s for s in read_lineage(self.base) if s.get("kind") == "base"), {}).get("tokens_seen")
        if not teacher:
            raise ValueError(f"{self.base}: its lineage has no 'base' step with tokens_seen (train it with bench.train)")
        p2 = _distill_args(2, extra2)[1]
        t2 = p2.steps * p2.batch * p2.seq_len
        steps1 = p1.steps if own else int((self.a.token_budget_pct / 100 * teacher - t2) // (p1.batch * p1.seq_len))
        if steps1 < 1:
            raise ValueError(f"--token-budget-pct {self.a.token_budget_pct}: phase 2 alone ({t2:,} tokens) uses it up")
        t1 = steps1 * p1.batch * p1.seq_len
        budget = {"teacher_tokens": teacher, "pct": self.a.token_budget_pct, "phase1_steps": steps1,
                  "phase1_tokens": t1, "phase2_tokens": t2, "used_pct": 100 * (t1 + t2) / teacher,
                  "phase1_pct": 100 * t1 / teacher, **({"steps_given": True} if own else {})}
        if run:
            self.q.setdefault("distill_budget_per_run", {})[run] = budget
        else:
            self.q["distill_budget"] = budget
        if own:
            self.log(f"{run}: its own --steps {steps1}: phase 1 {t1:,} tokens = {100 * t1 / teacher:.2f}% of "
                     f"{teacher:,} teacher tokens (not sized by --token-budget-pct)")
            return extra1
        self.log(f"token budget: {self.a.token_budget_pct}% of {teacher:,} teacher tokens -> phase 1 {steps1} steps "
                 f"({t1:,} tokens) + phase 2 {t2:,} tokens = {100 * (t1 + t2) / teacher:.2f}%")
        return [*extra1, "--steps", str(steps1)]

    def _phase1(self, student: Path, extra1: list[str], extra2: list[str]) -> bool:
        """Phase 1 into WORK/distill1. With ``--distill1-lrs`` (and/or ``--distill1-hidden-weights``) one run per
        combination (WORK/distill1-lrX[-hwW], each evaluated); WORK/distill1 then links to the run with the lowest
        phase-1 training forward KL (mean of its last 10 steps, from its lineage: the objective every candidate
        shares, whatever its hidden-state weight) — chosen on training data, not on the validation split the
        table reports — or to the run ``--distill2-from`` names, whatever its KL."""
        from pack.checkpoint import read_lineage

        dst = self.work / "distill1"
        lrs = [x for x in self.a.distill1_lrs.split(",") if x]
        hws = [x for x in self.a.distill1_hidden_weights.split(",") if x]
        variants = dict(self.a.distill1_variants)
        # --distill1-select M: one more variant per pool multiple, trained on the windows distill.select keeps
        selects = {f"distill1-select-x{m}": m for m in self.a.distill1_select}
        variants.update({name.removeprefix("distill1-"): [] for name in selects})
        if variants and (lrs or hws):
            raise ValueError("--distill1-variants / --distill1-select replace --distill1-lrs / "
                             "--distill1-hidden-weights: use one")
        if not lrs and not hws and not variants:  # (_drop_downstream removed an earlier call's WORK/distill1)
            if not self.run("distill1", self._distill_cmd(1, student, dst, extra1), min_s=60):
                return False
            self.evaluate("distill1", dst)
            return True
        runs = {f"distill1-{name}": args for name, args in variants.items()}  # name -> extra args
        if not variants:
            for lr in lrs or [None]:
                for hw in hws or [None]:
                    name = "distill1" + (f"-lr{lr}" if lr else "") + (f"-hw{hw}" if hw else "")
                    runs[name] = [*(["--lr", lr] if lr else []), *(["--hidden-weight", hw] if hw else [])]
        if self.a.distill2_from:  # the chosen run first: one at a time, the deadline then cuts the others
            first = f"distill1-{self.a.distill2_from}"
            runs = {first: runs[first], **{k: v for k, v in runs.items() if k != first}}
        fulls: dict[str, list[str]] = {}

        def full_args(name: str) -> list[str]:
            # a variant's own --batch / --seq-len size its --steps under --token-budget-pct (unless it sets them)
            if name not in fulls:
                args = [*extra1, *runs[name]]
                fulls[name] = self._token_budget(args, extra2, name) if self.a.token_budget_pct and variants else args
            return fulls[name]

        def train(name: str) -> bool:
            full = full_args(name)
            if name in selects:
                sel = self._select(name, student, full, selects[name])
                if sel is None:
                    with self._lock:
                        self.q.get("distill_budget_per_run", {}).pop(name, None)  # that run never happened
                    return False
                full = [*full, "--data", str(sel)]
            return self.run(name, self._distill_cmd(1, student, self.work / name, full), min_s=60)

        def train_in_thread(name: str) -> bool:
            return self._isolated(name, lambda: train(name))

        kls, done, averaged = {}, {}, set()
        parallel = self.a.parallel > 1 and len(runs) > 1
        if parallel:
            # the small pair leaves an H200 mostly idle (~2 % MFU, launch-bound): N runs at once take about the
            # time of one (their logged tok/s and MFU are then shares of the GPU); the evaluations follow one by one
            for name in runs:
                full_args(name)  # budgets first, in this thread (they write quality.json and the log)
            self.log(f"phase 1: {len(runs)} runs, {min(self.a.parallel, len(runs))} at a time")
            with ThreadPoolExecutor(self.a.parallel) as ex:
                done = dict(zip(runs, ex.map(train_in_thread, runs)))
        for name in runs:
            if done[name] if parallel else train(name):  # one at a time: train, then evaluate
                step = read_lineage(self.work / name)[-1]
                kls[name] = step["loss_last10"]["forward_kl"]
                if "ema" in step:
                    averaged.add(name)
                self.evaluate(name, self.work / name)
        chosen = f"distill1-{self.a.distill2_from}" if self.a.distill2_from else None
        if chosen not in kls if chosen else not kls:  # no run to continue from: say why (deadline or failure)
            states = {self.q["stages"].get(n, {}).get("status", "failed") for n in ([chosen] if chosen else runs)}
            status = "skipped" if states == {"skipped"} else "failed"
            why = f"--distill2-from {self.a.distill2_from}: that run {status}" if chosen else "no phase-1 run finished"
            self.stage("distill1", status, reason=why)
            return False
        # a run on distill.select's windows trains on the hardest windows: its training KL is higher by design and
        # not comparable with the others'; a run with --ema-decay logs the KL of weights it does not write (it
        # writes their moving average). Both are evaluated like every run but compete only when nothing else ran.
        comparable = {k: v for k, v in kls.items() if k not in selects and k not in averaged}
        none_comparable = not comparable
        candidates = comparable or kls
        best = chosen or min(candidates, key=candidates.get)  # --distill2-from: the user's recipe, whatever its KL
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            shutil.rmtree(dst)
        dst.symlink_to(best)
        incomparable = sorted(set(kls) - set(comparable))
        self.q["distill1_selection"] = {"run": best, "args": runs[best],
                                        "by": (f"--distill2-from {self.a.distill2_from} (the training KLs "
                                               "were not used)" if chosen else
                                               "phase-1 training forward KL (mean of the last 10 steps)"),
                                        "train_forward_kl": kls,
                                        **({"not_compared": incomparable}
                                           if incomparable and (chosen or not none_comparable) else {}),
                                        **({"note": "only distill.select / --ema-decay runs: their training KLs "
                                                    "are not comparable (other windows, or not the written "
                                                    "weights); the lowest taken"}
                                           if none_comparable and not chosen else {})}
        if (row := self.q["rows"].get(best)) is not None:
            self.q["rows"]["distill1"] = dict(row, label="distill1", selected=best)
            self.goals()
        self.log(f"distill1: {best} selected ({'--distill2-from; ' if chosen else ''}training forward KL {kls})")
        self.stage("distill1", "ok", selected=best)  # saves quality.json; replaces an earlier call's failure record
        return True

    def _isolated(self, name: str, fn) -> bool:
        """``fn()`` for the run ``name`` (one of several, e.g. on a worker thread): an error marks that run failed
        and returns False, so one broken run does not cost the others theirs."""
        try:
            return fn()
        except (Exception, SystemExit) as e:  # noqa: BLE001
            self.stage(name, "failed", reason=f"{type(e).__name__}: {e}")
            return False

    def _select(self, name: str, student: Path, distill_args: list[str], mult: str) -> Path | None:
        """``python -m distill.select`` for the phase-1 run ``name`` (its ``distill_args`` fix the tokens it trains
        on): score a pool of ``mult`` x those tokens of the train split (``all``: every window) and keep the highest
        teacher-student KL windows into WORK/NAME.jsonl. What it scored goes to quality.json
        (``distill1_data_selection``). None when the selection failed."""
        from distill.select import meta_path

        cfg = _distill_args(1, distill_args)[1]
        tokens = cfg.steps * cfg.batch * cfg.seq_len
        out = self.work / f"{name}.jsonl"
        pool = [] if mult == "all" else ["--pool-tokens", str(int(float(mult) * tokens))]
        cmd = [sys.executable, "-m", "distill.select", "--teacher", str(self.base), "--student", str(student),
               "-o", str(out), "--tokens", str(tokens), "--seq-len", str(cfg.seq_len), "--device", self.a.device,
               "--force", "--no-progress", *pool, *(["--data", cfg.data] if cfg.data else [])]
        if not self.run(f"select-{name}", cmd, min_s=30):
            return None
        meta = json.loads(meta_path(out).read_text())
        keys = ("pool_windows", "kept_windows", "scored_tokens", "kept_tokens", "windows_available", "kl_pool",
                "kl_kept")
        with self._lock:
            self.q.setdefault("distill1_data_selection", {})[name] = {"pool": mult, **{k: meta[k] for k in keys}}
            self.save()
        return out

    def s_distill(self):
        if not _have("distill.__main__"):
            self.stage("distill", "skipped", reason="distill not available")
            return
        student = self.work / f"pruned-{_prune_name(self.a.distill_from)}"
        if not (student / "config.json").is_file():
            self.stage("distill", "skipped", reason=f"{student} missing (run the prune stage)")
            return
        self._drop_downstream()
        extra1, extra2 = shlex.split(self.a.distill1_args), shlex.split(self.a.distill2_args)
        if self.a.token_budget_pct and not (self.a.distill1_variants or self.a.distill1_select):
            extra1 = self._token_budget(extra1, extra2)
        if not self._phase1(student, extra1, extra2):
            if not self.a.phase1_only:
                self.stage("distill2", "skipped", reason="no phase-1 result in this call")
            return
        if self.a.phase1_only:
            self.stage("distill2", "skipped", reason="--phase1-only")
            return
        # phase 2 from the chosen run, and with --distill2-also from those runs too (WORK/distill2-from-NAME):
        # the same phase 2 after different phase-1 recipes on one teacher; up to --parallel at once (phase 2 is
        # sampling-bound and leaves the GPU mostly idle), evaluated one by one afterwards
        runs = {"distill2": self.work / "distill1"}
        for name in self.a.distill2_also:
            if (self.work / f"distill1-{name}" / "config.json").is_file():
                runs[f"distill2-from-{name}"] = self.work / f"distill1-{name}"
            else:
                self.stage(f"distill2-from-{name}", "skipped", reason=f"phase-1 run distill1-{name} did not finish")

        def phase2(name: str) -> bool:
            cmd = self._distill_cmd(2, runs[name], self.work / name, extra2)
            return self._isolated(name, lambda: self.run(name, cmd, min_s=60))

        done, parallel = {}, self.a.parallel > 1 and len(runs) > 1
        if parallel:
            with ThreadPoolExecutor(self.a.parallel) as ex:
                done = dict(zip(runs, ex.map(phase2, runs)))
        for name in runs:
            if done[name] if parallel else phase2(name):  # one at a time: run, then evaluate
                self.evaluate(name, self.work / name)

    def _drop_distilled(self, why: str) -> None:
        """A new pruned student makes every distilled checkpoint of an earlier call (``distill1*``, ``distill2*`` and
        their W4A16) stale: they were distilled from the old one, and ``final`` would quantize them. Drop them, their
        rows, stage records, budgets and selection."""
        gone = sorted({p.name for p in self.work.iterdir() if p.name.startswith(("distill1", "distill2"))})
        for n in gone:
            p = self.work / n
            p.unlink() if p.is_symlink() or not p.is_dir() else shutil.rmtree(p)
        rows = [k for k in self.q["rows"] if k.startswith(("distill1", "distill2"))]
        for k in rows:
            del self.q["rows"][k]
        for k in [k for k in self.q["stages"] if k.startswith(("distill1", "distill2")) or k == "final"]:
            del self.q["stages"][k]
        for k in ("distill_budget", "distill_budget_per_run", "distill1_selection", "distill1_data_selection"):
            self.q.pop(k, None)
        for key in ("distill1_recovered", "distill2_recovered", "final_quant_ppl_change_pct"):
            self.q["goals"].pop(key, None)
        if gone or rows:
            names = ", ".join(sorted(set(gone) | set(rows)))
            self.log(f"{why}: earlier distilled checkpoints and rows dropped ({names})")
        self.goals()
        self.save()

    def _drop_downstream(self) -> None:
        """A new phase 1 makes an earlier call's phase-1 choice (WORK/distill1, its row and selection), phase 2 and
        final W4A16 (checkpoints on this warm machine, rows and stage records in quality.json) stale: remove them,
        so ``final`` cannot quantize them and no table shows them as current, even if this phase 1 fails."""
        d1 = self.work / "distill1"
        if d1.is_symlink() or d1.is_file():  # a link to the chosen run: never delete through it
            d1.unlink()
        also = sorted({p.name for p in self.work.glob("distill2-from-*")} |
                      {k for k in [*self.q["rows"], *self.q["stages"]] if k.startswith("distill2-from-")})
        for name in ("distill1", "distill2", "distill2-w4a16", "distill1-w4a16", *also):
            if (self.work / name).is_dir():
                shutil.rmtree(self.work / name)
            if self.q["rows"].pop(name, None) is not None:
                self.log(f"dropped the earlier call's {name} (a new phase 1 runs)")
                if name.endswith("-w4a16"):
                    self.q["stages"].pop("final", None)
        for name in ("distill1", "distill2", *also):
            self.q["stages"].pop(name, None)
        self.q.pop("distill1_selection", None)
        for key in ("distill1_recovered", "distill2_recovered", "final_quant_ppl_change_pct"):
            self.q["goals"].pop(key, None)
        self.goals()
        self.save()

    def s_final(self):
        for name in ("distill2", "distill1", f"pruned-{_prune_name(self.a.distill_from)}"):
            if (self.work / name / "config.json").is_file():
                return self._quantize(self.work / name, "final")
        self.stage("final", "skipped", reason="no distilled or pruned checkpoint in --work")

    # ---------------------------------------------------------------------------------------- main
    def table(self) -> str:
        from bench.eval import format_table

        order = ["base", "base-w4a16", *sorted(k for k in self.q["rows"] if k.startswith("pruned-") and
                                               not k.endswith("w4a16")),
                 *sorted(k for k in self.q["rows"] if k.startswith("distill1-") and not k.endswith("w4a16")),
                 "distill1", "distill2", *sorted(k for k in self.q["rows"] if k.startswith("distill2-from-")),
                 *sorted(k for k in self.q["rows"] if k.startswith("distill") and k.endswith("w4a16")),
                 *sorted(k for k in self.q["rows"] if k.startswith("pruned-") and k.endswith("w4a16")),
                 *sorted(k for k in self.q["rows"] if k.startswith("scratch-"))]
        rows = [dict(self.q["rows"][k], name=k) for k in dict.fromkeys(order) if k in self.q["rows"]]
        t = format_table({"rows": rows, "unigram_ppl": self.q.get("unigram_ppl"),
                          "subset_fraction": self.q.get("eval", {}).get("subset_fraction")})
        return t + "\n" + "\n".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in self.q["goals"].items())

    def main(self, stages) -> int:
        import torch

        previous_base = self.q.get("base")
        self.q.update(device=torch.cuda.get_device_name() if self.a.device.startswith("cuda") else "cpu",
                      torch=torch.__version__, python=sys.version.split()[0], base=str(self.base))
        if previous_base is not None and previous_base != str(self.base):
            self._forget_old_base(f"--base is now {self.base} (was {previous_base})")
        # rows of an earlier call compare with this call's only if scored on the same tokens and prompts
        settings = {"max_tokens": self.a.eval_tokens or None, "prompts": self.a.prompts,
                    "new_tokens": self.a.new_tokens, "overlap_ngrams": list(self.a.overlap_ngrams)}
        if self.q.get("eval_settings", settings) != settings and self.q["rows"]:
            self.log(f"evaluation settings {settings} differ from the earlier calls' {self.q['eval_settings']}: "
                     f"their rows dropped ({', '.join(self.q['rows'])}); the base is evaluated again")
            self.q["rows"], self.q["goals"] = {}, {}
            for k in ("unigram_ppl", "eval"):
                self.q.pop(k, None)
        self.q["eval_settings"] = settings
        try:
            from bench.corpus import corpus_sha256
            from bench.tokenizer import get_tokenizer

            t = time.time()
            self.q["corpus_sha256"] = corpus_sha256()
            get_tokenizer(self.a.scale)
            self.stage("corpus", "ok", seconds=round(time.time() - t, 1), sha256=self.q["corpus_sha256"])
        except Exception as e:  # the corpus/tokenizer pin failed: nothing downstream is comparable
            self.stage("corpus", "failed", reason=f"{type(e).__name__}: {e}")
            return 2
        new_base = "train" in stages and not self.a.base  # s_train then drops the old base's row
        if "eval" not in stages and (new_base or "base" not in self.q["rows"]) and any(
                s in stages for s in ("quant", "prune", "distill", "final", "scratch")):
            i = stages.index("train") + 1 if "train" in stages else 0  # the base row is every comparison's
            stages = [*stages[:i], "eval", *stages[i:]]  # reference: evaluate the base before the rest
        if self.tools is not None and any(s != "eval" for s in stages):  # every other stage runs tools
            self.tools.start()  # imports in the background while the base is evaluated
        for s in stages:
            if s != "train" and not (self.base / "config.json").is_file():
                self.stage(s, "skipped", reason=f"no base checkpoint at {self.base}")
                continue
            try:
                getattr(self, f"s_{s}")()
            except Exception as e:  # record and go on with the next stage
                self.stage(s, "failed", reason=f"{type(e).__name__}: {e}")
        self.q["seconds"] = round(time.time() - self.t0, 1)
        self.save()
        print(self.table(), flush=True)
        return 0 if all(v["status"] != "failed" for v in self.q["stages"].values()) else 1


def _variants(spec: str) -> dict[str, list[str]]:
    """``"mlp=--trainable mlp; b8=--batch 8"`` -> {"mlp": ["--trainable", "mlp"], "b8": ["--batch", "8"]}."""
    out = {}
    for item in (x.strip() for x in spec.split(";")):
        if not item:
            continue
        name, sep, args = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip()):
            raise ValueError(f"--distill1-variants: {item!r} is not NAME=ARGS (NAME of letters, digits, _ . -)")
        out[name.strip()] = shlex.split(args)
    return out


def _have(module: str) -> bool:
    """Whether ``module`` (dotted names too) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _distill_args(phase: int, extra: list[str]):
    """distill's own parser and defaults applied to ``extra``: (the given args, the resolved DistillConfig)."""
    from distill.__main__ import build_parser, config_from_args

    a = build_parser().parse_args(["--teacher", "-", "--student", "-", "-o", "-", "--phase", str(phase), *extra])
    return a, config_from_args(a)


def _check_distill_args(a) -> None:
    """Every set of distill arguments the run will pass (``--distill1-args`` alone and with each variant,
    ``--distill2-args``) parsed and validated by distill itself now, not in a stage (or a worker thread) later.
    Raises ValueError naming the option."""
    sets = [("--distill1-args", 1, shlex.split(a.distill1_args)), ("--distill2-args", 2, shlex.split(a.distill2_args))]
    sets += [(f"--distill1-variants {name!r}", 1, [*shlex.split(a.distill1_args), *args])
             for name, args in a.distill1_variants.items()]
    for what, phase, extra in sets:
        try:
            _distill_args(phase, extra)
        except SystemExit:  # argparse: distill's parser has printed the reason on stderr
            raise ValueError(f"{what}: not valid python -m distill arguments (the line above says why)") from None
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None


def _pools(spec: str) -> tuple[str, ...]:
    """``"2,4,all"`` -> ("2", "4", "all"): pool multiples for --distill1-select (each a number >= 1, or all)."""
    out, seen = [], set()
    for x in (x.strip() for x in spec.split(",")):
        if not x:
            continue
        try:
            ok = x == "all" or float(x) >= 1
        except ValueError:
            ok = False
        if not ok or not re.fullmatch(r"[0-9.]+|all", x):
            raise argparse.ArgumentTypeError(f"{x!r}: a pool multiple is a number >= 1 or 'all'")
        value = x if x == "all" else float(x)
        if value in seen:
            raise argparse.ArgumentTypeError(f"{x!r}: the same pool twice")
        seen.add(value)
        out.append(x)
    return tuple(out)


def _names(spec: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"): phase-1 run names for --distill2-also (no repeats)."""
    out = tuple(x.strip() for x in spec.split(",") if x.strip())
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{spec!r}: a name twice")
    return out


PRUNE_OPTIONS = ("refit", "train")  # +refit: prune --refit; +train: calibrate on the train split


def _prune_entry(entry: str) -> tuple[str, frozenset]:
    """``activation`` -> ("activation", {}); ``activation+refit+train`` -> ("activation", {"refit", "train"}).
    ``+refit`` adds ``prune --refit``; ``+train`` calibrates on the train split (what the teacher was trained on)
    instead of the default calib split."""
    c, *opts = entry.split("+")
    bad = [o for o in opts if o not in PRUNE_OPTIONS] + [o for o in set(opts) if opts.count(o) > 1]
    if bad or not c:
        raise ValueError(f"--criteria entry {entry!r}: options are +refit and +train (e.g. activation+refit+train)")
    if c not in _prune_criteria():
        raise ValueError(f"--criteria entry {entry!r}: unknown criterion {c!r}; choose from "
                         f"{', '.join(_prune_criteria())}")
    return c, frozenset(opts)


def _prune_name(entry: str) -> str:
    """Checkpoint / row name of a --criteria entry: ``activation+refit`` -> ``activation-refit``,
    ``activation+train+refit`` -> ``activation-refit-train`` (options in a fixed order)."""
    c, opts = _prune_entry(entry)
    return "-".join([c, *(o for o in PRUNE_OPTIONS if o in opts)])


def _prune_criteria():
    try:
        from prune.config import CRITERIA

        return CRITERIA
    except ImportError:
        return ("activation", "wanda", "magnitude", "random")


def main(argv=None) -> int:
    from bench.eval import parse_ngrams

    ap = argparse.ArgumentParser(prog="python bench/gpu/quality_pipeline.py", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default=os.environ.get("STAGES", ",".join(DEFAULT_STAGES)),
                    help=f"comma-separated subset of {','.join(STAGES)} (env STAGES)")
    ap.add_argument("--out", default=os.environ.get("OUT", "quality-out"), help="where JSON/logs go (env OUT)")
    ap.add_argument("--work", default=os.environ.get("PDQ_WORK", "/tmp/pdq-quality"),
                    help="where checkpoints go (env PDQ_WORK)")
    ap.add_argument("--base", help="use this base checkpoint instead of training one")
    ap.add_argument("--scale", choices=("small", "micro"), default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("DEADLINE", 570)),
                    help="seconds this call may take (default 570: under the 600 s run limit)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--criteria", default="", help="prune criteria (default: all of prune.config.CRITERIA); "
                    "C+refit prunes with --refit too (checkpoint pruned-C-refit), C+train calibrates on the train "
                    "split (pruned-C-train); e.g. activation,activation+refit,activation+refit+train")
    ap.add_argument("--distill-from", default="activation",
                    help="criteria entry whose pruned model is distilled (e.g. activation or activation+refit)")
    ap.add_argument("--distill1-lrs", default="", metavar="LR,LR,...",
                    help="phase 1 once per lr (x hidden weight); the lowest phase-1 training forward KL becomes "
                         "distill1 (default: one run)")
    ap.add_argument("--distill1-hidden-weights", default="", metavar="W,W,...",
                    help="phase 1 once per --hidden-weight (x lr), selected like --distill1-lrs")
    ap.add_argument("--distill1-variants", default="", metavar="NAME=ARGS;...",
                    help="phase 1 once per variant (extra distill args, e.g. 'all=;mlp=--trainable mlp'), each "
                         "sized by --token-budget-pct with its own batch; selected like --distill1-lrs (or by "
                         "--distill2-from)")
    ap.add_argument("--distill1-select", type=_pools, default=(), metavar="M[,M...]",
                    help="phase 1 also once per M on the windows python -m distill.select keeps: the highest "
                         "teacher-student KL windows of a random pool of M x phase 1's tokens of the train split "
                         "('all': every window); variant select-xM, sized like --distill1-variants, evaluated, but "
                         "not selected for phase 2 while another run exists (its training KL is on harder windows)")
    ap.add_argument("--distill2-from", default="", metavar="NAME",
                    help="continue phase 2 from the phase-1 run NAME (a --distill1-variants name, or select-xM) "
                         "instead of the run with the lowest training forward KL: for a recipe whose own terms "
                         "(e.g. --ce-weight) raise that KL; it runs first. With --phase1-only it is the run that "
                         "WORK/distill1 and the final stage use")
    ap.add_argument("--distill2-also", type=_names, default=(), metavar="NAME[,NAME...]",
                    help="phase 2 also from these phase-1 runs (--distill1-variants names) into "
                         "WORK/distill2-from-NAME, each evaluated (row distill2-from-NAME), not quantized: the same "
                         "phase 2 after other phase-1 recipes on one teacher; needs --distill2-from (the run that "
                         "distill2 and the final stage follow); up to --parallel phase-2 runs at once")
    ap.add_argument("--phase1-only", action="store_true", help="stop after phase 1 (diagnostic runs)")
    ap.add_argument("--launch", choices=("fork", "exec"), default="fork",
                    help="how tools start: fork = children of one forkserver that imported torch and transformers "
                         "once (default; bench/toolrun.py); exec = a fresh `python -m` each")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="run up to N phase-1 runs (with their distill.select) at once on the one device, then "
                         "evaluate them one by one (default 1: each run is evaluated before the next starts)")
    ap.add_argument("--token-budget-pct", type=float, default=0.0, metavar="P",
                    help="size phase 1 (--steps) so both phases use P %% of the teacher's training tokens (0: off)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="validation tokens per eval (0: all)")
    ap.add_argument("--overlap-ngrams", type=parse_ngrams, default=(), metavar="N[,N...]",
                    help="bench.eval --overlap-ngrams: every metric also on targets seen in train as N-grams / novel")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    for t in ("train", "prune", "distill1", "distill2"):
        ap.add_argument(f"--{t}-args", default="", help=f"extra arguments for the {t} tool (one string)")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    if a.parallel < 1:
        ap.error(f"--parallel {a.parallel}: must be a positive integer")
    quantizing = [s for s in stages if s in ("quant", "final")]
    if quantizing and not _have("compressed_tensors"):  # found now, not after the device time of the stages before
        ap.error(f"stage(s) {', '.join(quantizing)} run python -m pack.quantize, "
                 "which needs compressed-tensors: pip install compressed-tensors (offline: pip install --no-index "
                 "--no-deps --target DIR <its wheels>, then PYTHONPATH=DIR), or leave those stages out")
    try:  # option strings checked here, not hours later in the stage that reads them
        for entry in [*(x for x in a.criteria.split(",") if x), a.distill_from]:
            _prune_entry(entry)
        a.distill1_variants = _variants(a.distill1_variants)
        clash = [n for n in a.distill1_variants if n in {f"select-x{m}" for m in a.distill1_select}]
        if clash:
            raise ValueError(f"--distill1-variants {clash[0]!r}: the name of a --distill1-select run; rename it")
        names = [*a.distill1_variants, *(f"select-x{m}" for m in a.distill1_select)]
        if a.distill2_from and a.distill2_from not in names:
            raise ValueError(f"--distill2-from {a.distill2_from!r}: not a --distill1-variants or --distill1-select "
                             f"run name ({', '.join(names) or 'none given'})")
        if a.distill2_from and "distill" not in stages:
            raise ValueError(f"--distill2-from {a.distill2_from!r}: the distill stage is not in --stages")
        if a.distill2_also:
            if not a.distill2_from or a.phase1_only:
                raise ValueError("--distill2-also: needs --distill2-from (the run distill2 follows) and phase 2 "
                                 "(not --phase1-only)")
            bad = [n for n in a.distill2_also if n not in names or n == a.distill2_from]
            if bad:
                raise ValueError(f"--distill2-also {bad[0]!r}: not a --distill1-variants or --distill1-select run "
                                 f"name other than --distill2-from's ({', '.join(names)})")
        if a.distill1_select and (a.distill1_lrs or a.distill1_hidden_weights):
            raise ValueError("--distill1-select runs beside --distill1-variants, not --distill1-lrs / "
                             "--distill1-hidden-weights: use variants")
        _check_distill_args(a)
    except ValueError as e:
        ap.error(str(e))
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the tools would flood pipeline.log
    return Pipeline(a).main(stages)


if __name__ == "__main__":
    sys.exit(main())
