"""bench/gpu/quality_pipeline.py's distillation options, end to end on CPU with the trained micro model.

``--token-budget-pct`` must size phase 1 from the teacher's own lineage so that phase 1 + phase 2 stay within the
budget; ``--distill1-lrs`` x ``--distill1-hidden-weights`` must run phase 1 once per combination, evaluate each,
and continue phase 2 from the run with the lowest phase-1 training forward KL (read back from that run's lineage,
compared here independently)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import quality_pipeline

REPO = Path(__file__).resolve().parents[1]


def _refused(capsys, *argv: str) -> tuple[int, str]:
    """The pipeline's ``main(argv)`` in this process, for options it must refuse before any stage runs (argparse's
    exit): (exit code, stderr). In-process because each case in a subprocess paid an interpreter start and a torch
    import (~5 s on CI's two cores) to test the same parsing."""
    with pytest.raises(SystemExit) as e:
        quality_pipeline.main(list(argv))
    return e.value.code, capsys.readouterr().err


def _pipeline(tmp_path, base, *args, stdout: list | None = None, rc: int = 0) -> tuple[Path, dict]:
    """Run the pipeline on CPU (micro scale, ``--base base`` unless None) with ``args``; it must exit with ``rc``;
    returns (work dir, quality.json) (and appends its stdout to ``stdout`` when given)."""
    work, out = tmp_path / "work", tmp_path / "out"
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"  # a new OUT per call, one WORK, as on the device
    cmd = [sys.executable, str(REPO / "bench/gpu/quality_pipeline.py"), "--scale", "micro", "--device", "cpu",
           *(["--base", str(base)] if base is not None else []), "--eval-tokens", "2048", "--prompts", "2",
           "--new-tokens", "4", *args, "--work", str(work), "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == rc, r.stdout[-3000:] + r.stderr[-3000:]
    if stdout is not None:
        stdout.append(r.stdout)
    return work, json.loads((out / "quality.json").read_text())


def test_token_budget_and_lr_selection(tmp_path, trained_micro):
    from pack.checkpoint import read_lineage

    work, q = _pipeline(tmp_path, trained_micro, "--stages", "prune,distill", "--criteria", "activation",
                        "--prune-args", "--samples 8 --seq-len 128", "--distill1-args", "--batch 2 --seq-len 128",
                        "--distill2-args", "--steps 1 --batch 2 --seq-len 128 --max-new-tokens 32",
                        "--distill1-lrs", "1e-4,1e-3", "--distill1-hidden-weights", "1,0", "--token-budget-pct", "5")

    teacher = next(s for s in read_lineage(trained_micro) if s.get("kind") == "base")["tokens_seen"]
    b = q["distill_budget"]
    assert b["teacher_tokens"] == teacher and b["phase2_tokens"] == 1 * 2 * 128
    assert b["phase1_tokens"] == b["phase1_steps"] * 2 * 128
    assert b["phase1_tokens"] + b["phase2_tokens"] <= 0.05 * teacher < b["phase1_tokens"] + b["phase2_tokens"] + 256

    runs = {f"distill1-lr{lr}-hw{hw}": (lr, hw) for lr in ("1e-4", "1e-3") for hw in ("1", "0")}
    kls = {name: read_lineage(work / name)[-1]["loss_last10"]["forward_kl"] for name in runs}
    for name, (lr, hw) in runs.items():  # every candidate ran with the budgeted steps and its own settings
        step = read_lineage(work / name)[-1]
        assert step["steps"] == b["phase1_steps"] and step["lr"] == float(lr)
        assert ("hidden_mse" in step["losses"]) == (hw != "0")
        assert name in q["rows"]
    best = min(kls, key=kls.get)
    assert q["distill1_selection"]["run"] == best
    assert (work / "distill1").resolve() == (work / best).resolve()
    assert q["rows"]["distill1"]["ppl"] == q["rows"][best]["ppl"]
    # phase 2 continued from the selected run
    d2 = read_lineage(work / "distill2")
    assert [s["kind"] for s in d2[-3:]] == ["prune", "distill", "distill"] and d2[-2]["lr"] == float(runs[best][0])


def test_refit_criteria_entry(tmp_path, trained_micro):
    """``--criteria activation,activation+refit,activation+train+refit`` prunes three times (``--refit`` into
    ``pruned-activation-refit``; ``+train`` also calibrates on the train split, ``pruned-activation-refit-train``)
    and ``--distill-from activation+refit`` distills the refit one."""
    from pack.checkpoint import read_lineage

    work, q = _pipeline(tmp_path, trained_micro, "--stages", "prune,distill",
                        "--criteria", "activation,activation+refit,activation+train+refit",
                        "--distill-from", "activation+refit",
                        "--prune-args=--samples 8 --seq-len 128",
                        "--distill1-args", "--steps 1 --batch 2 --seq-len 128",
                        "--distill2-args", "--steps 1 --batch 2 --seq-len 128 --max-new-tokens 32")
    assert {"pruned-activation", "pruned-activation-refit", "pruned-activation-refit-train"} <= set(q["rows"])
    plain = read_lineage(work / "pruned-activation")[-1]
    refit = read_lineage(work / "pruned-activation-refit")[-1]
    train = read_lineage(work / "pruned-activation-refit-train")[-1]
    assert "refit" not in plain["params"] and refit["params"]["refit"] is True and train["params"]["refit"] is True
    assert [s["calibration"][0]["split"] for s in (plain, refit, train)] == ["calib", "calib", "train"]
    prune_step = next(s for s in reversed(read_lineage(work / "distill1")) if s["kind"] == "prune")
    assert prune_step["params"].get("refit") is True and prune_step["calibration"][0]["split"] == "calib"
    assert q["rows"]["pruned-activation"]["ppl"] != q["rows"]["pruned-activation-refit"]["ppl"]
    assert q["rows"]["pruned-activation-refit"]["ppl"] != q["rows"]["pruned-activation-refit-train"]["ppl"]
    assert (work / "distill2").is_dir() and "distill2" in q["rows"]

    # a later call on the same warm machine that runs phase 1 again drops the earlier phase 2 (checkpoint, row),
    # so a `final` stage cannot quantize it and no table shows it as current; --new-tokens 0 skips greedy
    out2 = tmp_path / "out2"
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu/quality_pipeline.py"), "--scale", "micro", "--device",
                        "cpu", "--base", str(trained_micro), "--stages", "distill,final", "--phase1-only",
                        "--distill-from", "activation+refit", "--distill1-args", "--steps 1 --batch 2 --seq-len 128",
                        "--eval-tokens", "2048", "--new-tokens", "0", "--work", str(work), "--out", str(out2)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    q2 = json.loads((out2 / "quality.json").read_text())
    assert "distill2" not in q2["rows"] and not (work / "distill2").exists()
    assert q2["stages"]["distill1"]["status"] == "ok" and q2["rows"]["distill1"]["greedy"] is None
    assert q2["stages"]["final"]["status"] == "ok" and (work / "distill1-w4a16" / "config.json").is_file()


def test_criteria_entry_options_checked_at_start(tmp_path, capsys):
    """A criteria entry with an unknown or repeated option is refused before any stage runs."""
    for entry, msg in [("activation+wide", "options are +refit and +train"),
                       ("activation+refit+refit", "options are +refit and +train"), ("+refit", "options are"),
                       ("activaton+refit", "unknown criterion 'activaton'")]:
        code, err = _refused(capsys, "--stages", "prune", "--criteria", entry, "--work", str(tmp_path / "w"),
                             "--out", str(tmp_path / "o"))
        assert code == 2 and msg in err, err[-500:]
        assert not (tmp_path / "o" / "quality.json").exists()


def test_distill1_variants_phase1_only(tmp_path, trained_micro):
    """``--distill1-variants`` runs phase 1 once per NAME=ARGS, each sized by the token budget with its own batch;
    ``--phase1-only`` stops before phase 2."""
    from pack.checkpoint import read_lineage

    work, q = _pipeline(tmp_path, trained_micro, "--stages", "prune,distill", "--criteria", "activation",
                        "--prune-args=--samples 8 --seq-len 128", "--distill1-args", "--batch 2 --seq-len 128",
                        "--distill2-args", "--steps 1 --batch 2 --seq-len 128 --max-new-tokens 32",
                        "--distill1-variants", "all=; mlp4=--trainable mlp --batch 4; s3=--steps 3; ema=--ema-decay 0.5",
                        "--token-budget-pct", "5",
                        "--phase1-only")
    budget = q["distill_budget_per_run"]
    a, m = read_lineage(work / "distill1-all")[-1], read_lineage(work / "distill1-mlp4")[-1]
    assert (a["batch"], a["trainable"], m["batch"], m["trainable"]) == (2, "all", 4, "mlp")
    assert a["steps"] == budget["distill1-all"]["phase1_steps"]
    assert m["steps"] == budget["distill1-mlp4"]["phase1_steps"]
    assert abs(a["tokens_seen"] - m["tokens_seen"]) < 4 * 128  # the same budget, in steps of each batch
    own = budget["distill1-s3"]  # its own --steps: kept, and its tokens recorded against the budget
    assert read_lineage(work / "distill1-s3")[-1]["steps"] == own["phase1_steps"] == 3 and own["steps_given"]
    assert own["phase1_tokens"] == 3 * 2 * 128 and own["phase1_pct"] == 100 * own["phase1_tokens"] / own["teacher_tokens"]
    assert {"distill1-all", "distill1-mlp4", "distill1-ema"} <= set(q["rows"])
    # the --ema-decay run logged the KL of weights it did not write: evaluated, but not a candidate for phase 2
    chosen = q["distill1_selection"]
    assert chosen["run"] in budget and chosen["run"] != "distill1-ema" and chosen["not_compared"] == ["distill1-ema"]
    assert read_lineage(work / "distill1-ema")[-1]["ema"]["decay"] == 0.5
    assert not (work / "distill2").exists()


def test_distill2_from_overrides_the_kl_choice(tmp_path, trained_micro):
    """``--distill2-from NAME`` continues phase 2 from that variant even where another run has the lower training
    forward KL (a data cross-entropy term raises the KL it is selected by); ``--distill2-also`` runs the same phase 2
    from another variant beside it (``--parallel 2``: both at once). When the named run fails in a later call on the
    same machine, nothing of the earlier call's phase 1 / phase 2 is left for ``final`` or the table."""
    from pack.checkpoint import read_lineage

    work, q = _pipeline(tmp_path, trained_micro, "--stages", "prune,distill", "--criteria", "activation",
                        "--prune-args=--samples 8 --seq-len 128",
                        "--distill1-args", "--steps 2 --batch 2 --seq-len 128",
                        "--distill2-args", "--steps 1 --batch 2 --seq-len 128 --max-new-tokens 32",
                        "--distill1-variants", "kd=;ce=--ce-weight 1", "--distill2-from", "ce",
                        "--distill2-also", "kd", "--parallel", "2")
    kls = {n: read_lineage(work / n)[-1]["loss_last10"]["forward_kl"] for n in ("distill1-kd", "distill1-ce")}
    assert kls["distill1-kd"] < kls["distill1-ce"]  # the premise: the KL rule alone would have taken kd
    chosen = q["distill1_selection"]
    assert chosen["run"] == "distill1-ce" and chosen["by"].startswith("--distill2-from ce")
    assert chosen["train_forward_kl"] == kls and q["stages"]["distill1"] == {"status": "ok", "selected": "distill1-ce"}
    assert (work / "distill1").resolve() == (work / "distill1-ce").resolve()
    assert q["rows"]["distill1"]["ppl"] == q["rows"]["distill1-ce"]["ppl"]
    d2 = read_lineage(work / "distill2")  # phase 2 continued from the data-term run
    assert [s["kind"] for s in d2[-2:]] == ["distill", "distill"] and d2[-2]["losses"]["data_ce"]["weight"] == 1.0
    assert "distill2" in q["rows"]
    # --distill2-also kd: the same phase 2 from the other run, its own row, not selected and not quantized
    also = read_lineage(work / "distill2-from-kd")
    assert [s["kind"] for s in also[-2:]] == ["distill", "distill"] and "data_ce" not in also[-2]["losses"]
    assert also[-2]["phase"] == 1 and also[-1]["phase"] == 2 and also[-1]["steps"] == d2[-1]["steps"] == 1
    assert also[-2] == read_lineage(work / "distill1-kd")[-1]
    assert q["stages"]["distill2-from-kd"]["status"] == "ok"
    assert q["rows"]["distill2-from-kd"]["ppl"] != q["rows"]["distill2"]["ppl"]
    assert set(q["goals"]["ppl_ratio"]) >= {"distill2", "distill2-from-kd"}
    log = (tmp_path / "out0" / "pipeline.log").read_text().split("] stage distill1: ok", 1)[1]
    lines = [ln for ln in log.splitlines() if ln.startswith("[")]
    first_done = next(i for i, ln in enumerate(lines) if "] stage " in ln)
    assert sum("--phase 2" in ln for ln in lines[:first_done]) == 2, lines[:first_done + 1]  # both started at once

    # a second call whose named run fails: the earlier choice, phase 2 and their rows are gone, the call fails
    out2 = tmp_path / "out-fail"
    r = subprocess.run([sys.executable, str(REPO / "bench/gpu/quality_pipeline.py"), "--scale", "micro", "--device",
                        "cpu", "--base", str(trained_micro), "--stages", "distill", "--distill-from", "activation",
                        "--distill1-args", "--steps 1 --batch 2 --seq-len 128",
                        "--distill1-variants", f"bad=--data {tmp_path / 'missing.jsonl'}", "--distill2-from", "bad",
                        "--eval-tokens", "2048", "--new-tokens", "0", "--work", str(work), "--out", str(out2)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    q2 = json.loads((out2 / "quality.json").read_text())
    assert q2["stages"]["distill1-bad"]["status"] == "failed"
    assert q2["stages"]["distill1"] == {"status": "failed", "reason": "--distill2-from bad: that run failed"}
    assert q2["stages"]["distill2"]["status"] == "skipped" and "distill1_selection" not in q2
    assert not {"distill1", "distill2"} & set(q2["rows"]) and "distill1_recovered" not in q2["goals"]
    assert not (work / "distill1").exists() and not (work / "distill1").is_symlink()
    assert not (work / "distill2").exists() and (work / "distill1-ce" / "config.json").is_file()
    assert not (work / "distill2-from-kd").exists() and "distill2-from-kd" not in {*q2["rows"], *q2["stages"]}


def test_distill1_select_variants(tmp_path, trained_micro):
    """``--distill1-select 2,3`` adds one phase-1 run per pool multiple, trained on the windows distill.select
    keeps: as many tokens as the budget gives that run, chosen from a pool of 2x / 3x them (``all``, the whole train
    split, is too slow for the CPU: distill.select's own tests cover the whole-data pool); the selection's numbers
    land in quality.json and in the run's lineage."""
    from distill.select import meta_path
    from pack.checkpoint import read_lineage

    work, q = _pipeline(tmp_path, trained_micro, "--stages", "prune,distill", "--criteria", "activation",
                        "--prune-args=--samples 8 --seq-len 128", "--distill1-args", "--batch 2 --seq-len 128",
                        "--distill2-args", "--steps 1 --batch 2 --seq-len 128 --max-new-tokens 32",
                        "--distill1-variants", "all=--lr 1e-2", "--distill1-select", "2,3", "--token-budget-pct", "2",
                        "--phase1-only", "--parallel", "3")
    # --parallel 3: the three runs (two behind their distill.select) at once; each tool's output stays one block
    log = (tmp_path / "out0" / "pipeline.log").read_text()
    assert "phase 1: 3 runs, 3 at a time" in log
    after = [ln for ln in log.split("phase 1: 3 runs, 3 at a time", 1)[1].splitlines() if ln.startswith("[")]
    first_done = next(i for i, ln in enumerate(after) if "] stage " in ln)
    assert sum("] $ " in ln for ln in after[:first_done]) == 3, after[:first_done + 1]  # all three started at once
    for name in ("distill1-all", "distill1-select-x2", "distill1-select-x3"):
        block = log.split(f"--- {name} ---\n", 1)[1].split("\n[", 1)[0]  # up to the next pipeline line
        assert f"wrote {work / name} (phase 1" in block, block[-500:]
        assert block.count("distill phase 1:") == 1
    budget = q["distill_budget_per_run"]
    assert set(budget) == {"distill1-all", "distill1-select-x2", "distill1-select-x3"}
    sel = q["distill1_data_selection"]
    for name, pool in (("distill1-select-x2", 2), ("distill1-select-x3", 3)):
        step = read_lineage(work / name)[-1]
        tokens = budget[name]["phase1_tokens"]
        kept = step["data"]["selection"]["kept_tokens"]
        assert step["tokens_seen"] == tokens == sel[name]["kept_tokens"] == kept
        assert step["data"]["source"] == str(work / f"{name}.jsonl")
        want_pool = pool * tokens // 128
        assert sel[name]["windows_available"] > want_pool == sel[name]["pool_windows"]
        assert sel[name]["scored_tokens"] == want_pool * 128
        assert sel[name]["kl_kept"]["mean"] > sel[name]["kl_pool"]["mean"]
        assert meta_path(work / f"{name}.jsonl").is_file() and name in q["rows"]
    assert read_lineage(work / "distill1-all")[-1]["data"]["source"] == "bench.corpus:train"
    # the selection runs' training KL is on harder windows: the one other run is chosen even where its own training
    # KL is the highest (an lr of 1e-2 wrecks it)
    chosen = q["distill1_selection"]
    kls = chosen["train_forward_kl"]
    assert max(kls, key=kls.get) == "distill1-all", kls
    assert chosen["run"] == "distill1-all" and chosen["not_compared"] == ["distill1-select-x2", "distill1-select-x3"]
    assert not (work / "distill2").exists()


def test_distill1_select_options_checked_at_start(tmp_path, capsys):
    for extra, msg in ((["--distill1-select", "2,0.5"], "'0.5': a pool multiple is a number >= 1 or 'all'"),
                       (["--distill1-select", "2,2.0"], "'2.0': the same pool twice"),
                       (["--distill1-select", "2", "--distill1-variants", "select-x2=--lr 1e-4"],
                        "'select-x2': the name of a --distill1-select run"),
                       (["--distill1-select", "2", "--distill1-lrs", "1e-4"], "not --distill1-lrs"),
                       (["--distill1-variants", "a=--lrr 1"], "--distill1-variants 'a': not valid python -m distill"),
                       (["--distill1-variants", "a=;b=--ce-weight 0.1", "--distill2-from", "c"],
                        "--distill2-from 'c': not a --distill1-variants or --distill1-select run name (a, b)"),
                       (["--distill1-lrs", "1e-4,2e-4", "--distill2-from", "lr1e-4"],
                        "--distill2-from 'lr1e-4': not a --distill1-variants or --distill1-select run name (none "
                        "given)"),
                       (["--stages", "prune", "--distill1-select", "2", "--distill2-from", "select-x2"],
                        "--distill2-from 'select-x2': the distill stage is not in --stages"),
                       (["--distill1-variants", "a=;b=--lr 2e-4", "--distill2-also", "b"],
                        "--distill2-also: needs --distill2-from"),
                       (["--distill1-variants", "a=;b=--lr 2e-4", "--distill2-from", "a", "--distill2-also", "b",
                         "--phase1-only"], "--distill2-also: needs --distill2-from"),
                       (["--distill1-variants", "a=;b=--lr 2e-4", "--distill2-from", "a", "--distill2-also", "a"],
                        "--distill2-also 'a': not a --distill1-variants or --distill1-select run name other than"),
                       (["--distill1-variants", "a=;b=--lr 2e-4", "--distill2-from", "a", "--distill2-also", "b,c"],
                        "--distill2-also 'c': not a"),
                       (["--distill2-also", "b,b"], "'b,b': a name twice"),
                       (["--distill1-args", "--ema-decay 1"], "--distill1-args: --ema-decay 1.0: must be in [0, 1)"),
                       (["--distill2-args", "--beta 2"], "--distill2-args: --beta 2.0: must be in [0, 1]")):
        code, err = _refused(capsys, *extra, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
        assert code == 2 and msg in err, err
    assert not (tmp_path / "w").exists()


def test_quantize_stages_need_compressed_tensors_at_start(tmp_path, capsys, monkeypatch):
    """Without compressed-tensors the quant / final stages are refused before any stage runs (they used to fail
    at the end of a GPU call, after its training)."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "compressed_tensors", None)  # not importable (find_spec returns None)
        for stages, named in (("train,eval,final", "final"), ("quant,prune", "quant")):
            code, err = _refused(capsys, "--stages", stages, "--work", str(tmp_path / "w"),
                                 "--out", str(tmp_path / "o"))
            assert code == 2 and f"stage(s) {named} run python -m pack.quantize" in err, err
    assert not (tmp_path / "w").exists()
    run = ("import runpy, sys; sys.modules['compressed_tensors'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", run, str(REPO / "bench/gpu/quality_pipeline.py"), "--stages", "prune",
                        "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--base", str(tmp_path / "none")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "compressed-tensors" not in r.stderr  # stages without pack.quantize do not need it


def test_scratch_control_stage(tmp_path, trained_micro):
    """``--stages scratch`` trains the pruned width (kept_width(640, 0.2) = 512 for micro) from scratch with the
    given train args and evaluates it against the base (with ``--overlap-ngrams``: also per target subset)."""
    from pack.checkpoint import read_lineage

    printed = []
    work, q = _pipeline(tmp_path, trained_micro, "--stages", "scratch",
                        "--train-args", "--steps 3 --warmup 1 --eval-every 3", "--overlap-ngrams", "4",
                        stdout=printed)
    cfg = json.loads((work / "scratch-mlp512" / "config.json").read_text())
    assert cfg.get("text_config", cfg)["intermediate_size"] == 512
    step = read_lineage(work / "scratch-mlp512")[-1]
    assert step["model"].endswith("-mlp512")
    assert step["recipe"]["steps"] == 3 and step["recipe"]["mlp_width"] == 512
    assert "scratch-mlp512" in q["rows"] and q["rows"]["scratch-mlp512"]["ppl"] > q["rows"]["base"]["ppl"]
    ratio = q["goals"]["ppl_ratio"]["scratch-mlp512"]
    assert ratio == q["rows"]["base"]["ppl"] / q["rows"]["scratch-mlp512"]["ppl"] and 0 < ratio < 1
    assert q["goals"]["ce_ratio"]["scratch-mlp512"] == q["rows"]["base"]["nll"] / q["rows"]["scratch-mlp512"]["nll"]
    # --overlap-ngrams 4: every row split into targets seen in train as 4-grams / novel, the ratio per part
    by = q["goals"]["ppl_ratio_by_subset"]
    for part in ("seen4", "novel4"):
        b, s = q["rows"]["base"]["subsets"][part], q["rows"]["scratch-mlp512"]["subsets"][part]
        assert by[part]["scratch-mlp512"] == b["ppl"] / s["ppl"] and b["tokens"] == s["tokens"] > 0
    assert q["eval"]["overlap_ngrams"] == [4] and 0 < q["eval"]["subset_fraction"]["seen4"] < 1
    table = printed[0][printed[0].rindex("checkpoint"):]  # the closing table: every row, then per subset
    assert "scratch-mlp512" in table.split("targets seen4")[0] and "targets novel4" in table


def test_new_base_drops_the_earlier_calls_numbers(tmp_path, trained_micro):
    """A call that trains a new base in a WORK dir an earlier call used (a warm device machine) must not carry that
    call's numbers over: its rows, the eval's per-subset split (``--overlap-ngrams``), the distill budget and its
    stage records described the old base (a device run once printed empty ``targets seen8`` sections this way)."""
    _, q1 = _pipeline(tmp_path, trained_micro, "--stages", "eval,prune,distill", "--criteria", "activation",
                      "--prune-args", "--samples 4 --seq-len 64", "--distill1-args", "--batch 2 --seq-len 64",
                      "--distill2-args", "--steps 1 --batch 2 --seq-len 64 --max-new-tokens 16", "--phase1-only",
                      "--token-budget-pct", "1", "--overlap-ngrams", "4")
    assert q1["eval"]["overlap_ngrams"] == [4] and "distill_budget" in q1 and "distill1" in q1["rows"]
    work = tmp_path / "work"
    assert (work / "distill1").exists() and (work / "pruned-activation").is_dir()
    printed = []
    # no "eval" asked for: the new base's row must still be made (every comparison needs it), and the old base's
    # checkpoints must be gone so that nothing downstream starts from them
    _, q2 = _pipeline(tmp_path, None, "--stages", "train,prune", "--criteria", "magnitude",
                      "--train-args", "--steps 2 --warmup 1 --eval-every 2", stdout=printed)
    assert set(q2["rows"]) == {"base", "pruned-magnitude"}
    assert q2["rows"]["base"]["ppl"] != q1["rows"]["base"]["ppl"]
    assert "overlap_ngrams" not in q2["eval"] and "subset_fraction" not in q2["eval"]
    assert "distill_budget" not in q2 and "distill1_selection" not in q2
    assert set(q2["stages"]) <= {"corpus", "train", "eval", "prune-magnitude"}
    assert q2["stages"]["train"]["status"] == "ok" and q2["goals"]["ppl_ratio"]["pruned-magnitude"] > 0
    assert sorted(p.name for p in work.iterdir()) == ["base", "pruned-magnitude", "quality.json"]
    assert "targets" not in printed[0][printed[0].rindex("checkpoint"):]
    # another --base than the one the rows describe: the same clean slate
    _, q3 = _pipeline(tmp_path, trained_micro, "--stages", "eval")
    assert set(q3["rows"]) == {"base"} and q3["rows"]["base"]["ppl"] == q1["rows"]["base"]["ppl"]
    assert "train" not in q3 and sorted(p.name for p in work.iterdir()) == ["base", "quality.json"]


def test_fork_and_exec_launch_write_the_same_bytes(tmp_path, trained_micro):
    """``--launch fork`` (the default: each tool a fork of one forkserver that imported torch and transformers,
    bench/toolrun.py) against ``--launch exec`` (a fresh ``python -m`` per tool, the reference): the same
    checkpoints byte for byte and the same numbers; and a forked tool that fails is a failed stage."""
    runs = {}
    for launch in ("exec", "fork"):
        runs[launch] = _pipeline(tmp_path / launch, trained_micro, "--launch", launch, "--stages",
                                 "prune,distill", "--criteria", "activation", "--phase1-only",
                                 "--prune-args", "--samples 4 --seq-len 64",
                                 "--distill1-args", "--steps 2 --batch 2 --seq-len 64")
    (we, qe), (wf, qf) = runs["exec"], runs["fork"]
    for ckpt in ("pruned-activation", "distill1"):  # (pack.quantize in a fork: test_refit_criteria_entry)
        files = sorted(p.name for p in (we / ckpt).iterdir())
        assert files == sorted(p.name for p in (wf / ckpt).iterdir()) and "config.json" in files, ckpt
        for name in files:
            if name.endswith((".safetensors", ".json")) and name != "pdqkit_lineage.json":
                assert (we / ckpt / name).read_bytes() == (wf / ckpt / name).read_bytes(), f"{ckpt}/{name}"

    def numbers(q):  # each row without where its checkpoint lies and how long its eval took
        return {k: {f: v for f, v in row.items() if f not in ("path", "seconds")} for k, row in q["rows"].items()}

    assert numbers(qe) == numbers(qf) and set(qf["rows"]) == {"base", "pruned-activation", "distill1"}

    # a forked tool's failure: its exit code and last lines in the stage record, the pipeline's exit code 1
    _, q = _pipeline(tmp_path / "bad", trained_micro, "--stages", "prune", "--criteria", "activation",
                     "--prune-args=--no-such-option", rc=1)
    s = q["stages"]["prune-activation"]
    assert s["status"] == "failed" and s["rc"] == 2 and "unrecognized arguments: --no-such-option" in s["tail"]


def test_rows_stay_consistent_across_calls(tmp_path, trained_micro):
    """Three findings of the thirty-fourth session's review, on one warm WORK dir: a base not named ``base`` still
    gets the ``base-w4a16`` row (and the quantization goal); a new pruned student drops the distilled checkpoints
    and rows made from the old one (``final`` would quantize them, ``distill*_recovered`` would compare across);
    and a call that scores on other tokens drops the earlier rows instead of comparing with them."""
    assert trained_micro.name != "base"
    args = ("--criteria", "magnitude", "--distill-from", "magnitude", "--distill1-args", "--steps 1 --batch 2 "
            "--seq-len 64", "--phase1-only")
    work, q1 = _pipeline(tmp_path, trained_micro, "--stages", "eval,quant,prune,distill", *args)
    assert {"base", "base-w4a16", "pruned-magnitude", "distill1"} <= set(q1["rows"])
    assert "quant_ppl_change_pct" in q1["goals"] and (work / "base-w4a16" / "config.json").is_file()
    _, q2 = _pipeline(tmp_path, trained_micro, "--stages", "prune", "--ratio", "0.5", *args)
    assert not any(k.startswith("distill") for k in q2["rows"]) and not (work / "distill1").exists()
    assert "distill1_recovered" not in q2["goals"] and "base-w4a16" in q2["rows"]
    _, q3 = _pipeline(tmp_path, trained_micro, "--stages", "eval", "--eval-tokens", "1024")
    assert set(q3["rows"]) == {"base"} and q3["rows"]["base"]["tokens"] < q2["rows"]["base"]["tokens"]
