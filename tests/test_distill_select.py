"""``python -m distill.select`` on CPU with a micro pair: the per-window KL against a direct full-logit reference,
the top-k rule, the written file (rows, order, sidecar, bytes), and distill training on it with the selection
carried into its lineage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.__main__ import main as distill_main
from distill.data import load_blocks
from distill.models import load_model
from distill.select import main as select_main
from distill.select import meta_path, pick, window_kl
from distill.toy import save_pair
from pack.checkpoint import read_lineage, sha256_file

torch.set_num_threads(1)
SEQ = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("select_pair")
    # a student far enough from its teacher (MLP 640 -> 256) that windows differ clearly in KL
    teacher, student = save_pair(root, "micro", width=256)
    g = torch.Generator().manual_seed(1)
    with open(root / "data.jsonl", "w") as fh:
        for _ in range(6):
            fh.write(json.dumps({"input_ids": torch.randint(4, 2048, (SEQ * 4,), generator=g).tolist()}) + "\n")
    # half the windows repeat one short pattern: easy for both models, so they score differently
    with open(root / "data.jsonl", "a") as fh:
        fh.write(json.dumps({"input_ids": [7, 8, 9, 10] * (SEQ * 3)}) + "\n")
    return teacher, student, root / "data.jsonl"


def _reference_kl(teacher, student, ids, temperature=1.0):
    """Mean over positions of T^2 KL(p_t || q_s) from the models' own full (softcapped) logits."""
    with torch.no_grad():
        lt = teacher(input_ids=ids).logits.float() / temperature
        ls = student(input_ids=ids).logits.float() / temperature
    kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="none").sum(-1)
    return kl.mean(1) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_window_kl_matches_full_logits(pair, temperature):
    teacher_dir, student_dir, data = pair
    t, s = load_model(teacher_dir, torch.float32), load_model(student_dir, torch.float32)
    ids = load_blocks(str(data), None, SEQ, None, 2048).blocks[[0, 1, 2, -2, -1]]  # random text + the pattern
    ref = _reference_kl(t, s, ids, temperature)
    got = window_kl(t, s, ids, chunk=37, temperature=temperature)  # chunks straddle window borders
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    assert ref.std() > 0.05 * ref.mean()  # the windows really differ: the ranking below is not vacuous


def test_pick_top_k_ties_to_lower_index():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.2, 0.3])
    assert pick(scores, 1).tolist() == [1]
    assert pick(scores, 2).tolist() == [1, 3]
    assert pick(scores, 3).tolist() == [1, 2, 3]  # 0.3 tie: index 2 before 5
    assert pick(scores, 6).tolist() == list(range(6))
    for bad in (0, 7):
        with pytest.raises(ValueError, match="cannot keep"):
            pick(scores, bad)


def _sel_args(teacher, student, out, data, *extra):
    return ["--teacher", str(teacher), "--student", str(student), "-o", str(out), "--data", str(data),
            "--seq-len", str(SEQ), "--batch-size", "3", "--device", "cpu", "--no-progress", *map(str, extra)]


def test_select_keeps_the_highest_kl_windows(pair, tmp_path):
    teacher_dir, student_dir, data = pair
    out = tmp_path / "sel.jsonl"
    assert select_main(_sel_args(teacher_dir, student_dir, out, data, "--tokens", SEQ * 7)) == 0
    blocks = load_blocks(str(data), None, SEQ, None, 2048).blocks
    ref = _reference_kl(load_model(teacher_dir, torch.float32), load_model(student_dir, torch.float32), blocks)
    want = sorted(torch.topk(ref, 7).indices.tolist())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["window"] for r in rows] == want  # ascending window order, the reference's top 7
    for r in rows:
        assert r["input_ids"] == blocks[r["window"]].tolist()
        assert r["kl"] == pytest.approx(float(ref[r["window"]]), rel=1e-4)
    # the repeated pattern (the last windows) is the easy part: none of it is kept
    easy = [i for i in range(len(blocks)) if blocks[i].tolist()[:4] == [7, 8, 9, 10]]
    assert easy and not set(easy) & set(want)

    meta = json.loads(meta_path(out).read_text())
    assert meta["jsonl_sha256"] == sha256_file(out)
    assert (meta["pool_windows"], meta["kept_windows"]) == (len(blocks), 7)
    assert meta["scored_tokens"] == len(blocks) * SEQ and meta["kept_tokens"] == 7 * SEQ
    assert meta["kl_kept"]["min"] >= max(float(ref[i]) for i in range(len(blocks)) if i not in want) * (1 - 1e-4)
    assert meta["kl_kept"]["mean"] > meta["kl_pool"]["mean"]

    # same input -> same bytes
    again = tmp_path / "again.jsonl"
    assert select_main(_sel_args(teacher_dir, student_dir, again, data, "--tokens", SEQ * 7)) == 0
    assert again.read_bytes() == out.read_bytes() and meta_path(again).read_bytes() == meta_path(out).read_bytes()
    # a pool is a seeded random subset of the windows (whole windows only), and the best of it are kept
    pools = []
    for seed in (0, 1):
        sub = tmp_path / f"pool{seed}.jsonl"
        assert select_main(_sel_args(teacher_dir, student_dir, sub, data, "--tokens", SEQ * 3,
                                     "--pool-tokens", SEQ * 8 + 5, "--seed", seed)) == 0
        m = json.loads(meta_path(sub).read_text())
        assert (m["pool_windows"], m["kept_windows"], m["scored_tokens"]) == (8, 3, 8 * SEQ)
        pool = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:8].tolist()
        want = sorted(sorted(pool, key=lambda i: -float(ref[i]))[:3])
        assert [json.loads(line)["window"] for line in sub.read_text().splitlines()] == want
        pools.append(sorted(pool))
    assert pools[0] != pools[1]


def test_distill_trains_on_a_selection_and_records_it(pair, tmp_path, capsys):
    teacher_dir, student_dir, data = pair
    sel = tmp_path / "sel.jsonl"
    assert select_main(_sel_args(teacher_dir, student_dir, sel, data, "--tokens", SEQ * 4)) == 0
    # distill cuts the file into the very windows that were kept
    chosen = torch.tensor([json.loads(line)["input_ids"] for line in sel.read_text().splitlines()])
    assert torch.equal(load_blocks(str(sel), None, SEQ, None, 2048).blocks, chosen)
    out = tmp_path / "d1"
    assert distill_main(["--teacher", str(teacher_dir), "--student", str(student_dir), "-o", str(out),
                         "--data", str(sel), "--threads", "1", "--steps", "2", "--batch", "2",
                         "--seq-len", str(SEQ)]) == 0
    assert "chosen by distill.select, 4 of " in capsys.readouterr().out
    step = read_lineage(out)[-1]
    assert step["data"]["sha256"] == sha256_file(sel)
    sel_meta = step["data"]["selection"]
    assert sel_meta == json.loads(meta_path(sel).read_text())
    assert sel_meta["scored_tokens"] > step["tokens_seen"] == 2 * 2 * SEQ

    # a sidecar that describes another file is refused, naming it
    sel.write_text(sel.read_text().replace('"window"', '"window" ', 1))
    assert distill_main(["--teacher", str(teacher_dir), "--student", str(student_dir), "-o", str(tmp_path / "d2"),
                         "--data", str(sel), "--threads", "1", "--steps", "1", "--batch", "2",
                         "--seq-len", str(SEQ)]) == 2
    err = capsys.readouterr().err
    assert "sel.jsonl.meta.json: describes another file" in err and err.count("\n") == 1
    assert not (tmp_path / "d2").exists()


def test_the_sidecar_names_models_and_data_by_absolute_path(pair, tmp_path, monkeypatch):
    """Given relative paths, the sidecar (copied into distill's lineage) records them absolute: as typed they would
    change with the working directory and name nothing outside it (a docs audit's find)."""
    teacher_dir, student_dir, data = pair
    monkeypatch.chdir(Path(data).parent)
    rel = [os.path.relpath(x) for x in (teacher_dir, student_dir, data)]
    assert select_main(_sel_args(*rel[:2], tmp_path / "s.jsonl", rel[2], "--tokens", SEQ)) == 0
    cfg = json.loads(meta_path(tmp_path / "s.jsonl").read_text())["config"]
    assert [cfg[k] for k in ("teacher", "student", "data")] == [str(Path(x).resolve()) for x in
                                                                (teacher_dir, student_dir, data)]


def test_distill_refuses_to_use_a_selection_otherwise(pair, tmp_path, capsys):
    """A run that would not train on the selected windows themselves, a sidecar that cannot be read, and a resume
    whose selection file was regenerated since the checkpoint: each refused in one line, nothing written."""
    teacher_dir, student_dir, data = pair
    sel = tmp_path / "sel.jsonl"
    assert select_main(_sel_args(teacher_dir, student_dir, sel, data, "--tokens", SEQ * 4)) == 0

    def distill(out, *extra):
        return distill_main(["--teacher", str(teacher_dir), "--student", str(student_dir), "-o", str(tmp_path / out),
                             "--data", str(sel), "--threads", "1", "--batch", "2", *map(str, extra)])
    for extra, msg in ((["--seq-len", 48], "windows of 32 tokens; --seq-len 48 would splice"),
                       (["--seq-len", SEQ, "--max-tokens", SEQ * 2], "--max-tokens 64 drops part of the 128")):
        assert distill("x", "--steps", 1, *extra) == 2
        err = capsys.readouterr().err
        assert f"{sel}: " in err and msg in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()

    # resume: the checkpoint remembers the data's sha256, not just its path
    assert distill("a", "--steps", 2, "--seq-len", SEQ, "--ckpt-every", 1, "--keep-ckpt") == 0
    assert select_main(_sel_args(teacher_dir, student_dir, sel, data, "--tokens", SEQ * 5, "--force")) == 0
    capsys.readouterr()
    assert distill("b", "--steps", 2, "--seq-len", SEQ, "--ckpt-dir", tmp_path / "a-ckpt", "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint was trained on other data" in err and err.count("\n") == 1, err

    meta_path(sel).write_text("{not json")
    assert distill("c", "--steps", 1, "--seq-len", SEQ) == 2
    err = capsys.readouterr().err
    assert "sel.jsonl.meta.json: unreadable selection metadata" in err and err.count("\n") == 1, err


def test_no_rename_when_a_file_appeared_while_scoring(pair, tmp_path, monkeypatch, capsys):
    """Scoring takes a while: a selection file that appears meanwhile is not overwritten, no sidecar is put beside
    it (both destinations are checked before the first rename), and no temp file is left."""
    import distill.select as sel_mod

    teacher_dir, student_dir, data = pair
    out = tmp_path / "s.jsonl"
    real = sel_mod.window_kl

    def scoring(*a, **kw):
        out.write_text("someone else's")
        return real(*a, **kw)
    monkeypatch.setattr(sel_mod, "window_kl", scoring)
    assert select_main(_sel_args(teacher_dir, student_dir, out, data, "--tokens", SEQ)) == 2
    assert f"{out} exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "someone else's" and not meta_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


@pytest.mark.parametrize("where", ["scoring", "writing"])
def test_a_stop_signal_ends_the_run_in_one_line_leaving_nothing(pair, tmp_path, monkeypatch, capsys, where):
    """SIGTERM (a scheduler, docker stop) or Ctrl-C while scoring or while the two files are written: exit 130, one
    line, neither file nor a temp file left (before, SIGTERM killed the process where it stood)."""
    import os
    import signal

    import distill.select as sel_mod

    teacher_dir, student_dir, data = pair
    out = tmp_path / "s.jsonl"
    if where == "scoring":
        real_kl = sel_mod.window_kl

        def scoring(*a, **kw):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_kl(*a, **kw)
        monkeypatch.setattr(sel_mod, "window_kl", scoring)
    else:   # after the sidecar's temp file is written, before the body's
        real_mkstemp, made = sel_mod.tempfile.mkstemp, []

        def mkstemp(*a, **kw):
            made.append(1)
            if len(made) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return real_mkstemp(*a, **kw)
        monkeypatch.setattr(sel_mod.tempfile, "mkstemp", mkstemp)
    assert select_main(_sel_args(teacher_dir, student_dir, out, data, "--tokens", SEQ)) == 130
    assert capsys.readouterr().err == "distill.select: error: interrupted; nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_a_stop_signal_during_the_renames_waits_for_both(pair, tmp_path, monkeypatch, capsys):
    """SIGTERM between the sidecar's rename and the selection's (--force over an earlier selection): held until
    both are in place, then said (before: the sidecar replaced, the old selection left, "nothing was written")."""
    import os
    import signal

    import distill.select as sel_mod

    teacher_dir, student_dir, data = pair
    out = tmp_path / "s.jsonl"
    assert select_main(_sel_args(teacher_dir, student_dir, out, data, "--tokens", SEQ * 2)) == 0
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:   # the sidecar is in place, the selection not yet
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(sel_mod.os, "replace", replace)
    capsys.readouterr()
    assert select_main(_sel_args(teacher_dir, student_dir, out, data, "--tokens", SEQ * 3, "--force")) == 130
    assert capsys.readouterr().err == (f"distill.select: error: interrupted: {out} and its sidecar "
                                       f"{meta_path(out).name} were written; interrupted as they were put in place\n")
    assert len(calls) == 2 and len(out.read_text().splitlines()) == 3
    assert json.loads(meta_path(out).read_text())["kept_windows"] == 3


def test_cli_errors_are_one_line(pair, tmp_path, capsys):
    teacher_dir, student_dir, data = pair
    cases = [
        (["--tokens", SEQ * 100], "the pool has", 2),
        (["--tokens", SEQ * 4, "--pool-tokens", SEQ], "--pool-tokens 32: must be at least --tokens 128", 2),
        (["--tokens", 5], "--tokens 5: keeps no window of --seq-len 32", 2),
        (["--tokens", SEQ, "--temperature", "0"], "--temperature 0.0: must be a positive number", 2),
    ]
    for extra, msg, rc in cases:
        assert select_main(_sel_args(teacher_dir, student_dir, tmp_path / "s.jsonl", data, *extra)) == rc
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert not list(tmp_path.iterdir())  # nothing half-written
    assert select_main(_sel_args(teacher_dir, student_dir, tmp_path / "s.txt", data, "--tokens", SEQ)) == 2
    assert "the selection is a .jsonl file" in capsys.readouterr().err
    meta_path(tmp_path / "s.jsonl").write_text("{}")  # a sidecar alone: named as what exists
    assert select_main(_sel_args(teacher_dir, student_dir, tmp_path / "s.jsonl", data, "--tokens", SEQ)) == 2
    assert f"{meta_path(tmp_path / 's.jsonl')} exists; pass --force" in capsys.readouterr().err
    meta_path(tmp_path / "s.jsonl").unlink()
    (tmp_path / "s.jsonl").write_text("")
    assert select_main(_sel_args(teacher_dir, student_dir, tmp_path / "s.jsonl", data, "--tokens", SEQ)) == 2
    assert f"{tmp_path / 's.jsonl'} exists; pass --force" in capsys.readouterr().err
    assert select_main(_sel_args(teacher_dir, student_dir, tmp_path / "s.jsonl", data, "--tokens", SEQ,
                                 "--force")) == 0
    assert meta_path(tmp_path / "s.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s.jsonl.meta.json"]  # no temp files left
