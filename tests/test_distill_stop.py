"""Ctrl-C / SIGTERM during ``python -m distill`` (distill/stop.py): the run finishes its step, writes a training
checkpoint and exits 130 with one line naming it; ``--resume`` from it writes the bytes of an uninterrupted run. A
second signal stops at once (exit 130, naming the newest checkpoint if there is one); a second one within
``REPEAT_S`` of the first (torchrun's forwarded copy of the terminal's Ctrl-C) changes nothing. Under torchrun a
signal to one rank stops both at the same step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill.stop as stop
import distill.train as train
from distill.__main__ import main as distill_main
from pack.checkpoint import read_lineage
from tests.distill_fixtures import saved_micro_pair

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return saved_micro_pair(tmp_path_factory.mktemp("distill_stop_pair"))


def _args(pair, out, *extra):
    teacher, student, data = pair
    return ["--teacher", str(teacher), "--student", str(student), "-o", str(out), "--data", str(data), "--threads",
            "1", "--steps", STEPS, "--batch", 2, "--seq-len", 32, "--lr", 3e-4, "--log-every", 100,
            *map(str, extra)]


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """An uninterrupted run's output."""
    ref = tmp_path_factory.mktemp("distill_stop_ref") / "ref"
    assert distill_main([str(a) for a in _args(pair, ref)]) == 0
    return ref


def _signals_during(monkeypatch, at: dict[int, list[int]]) -> None:
    """Send this process the signals ``at[i]`` at the end of step ``i`` (0-based), as a terminal or a scheduler
    would while the step runs: the handler runs as soon as os.kill returns."""
    real = train.Distiller.step

    def step(self, i, ids):
        rec = real(self, i, ids)
        for s in at.get(i, []):
            os.kill(os.getpid(), s)
        return rec

    monkeypatch.setattr(train.Distiller, "step", step)


def _same_output(out: Path, ref: Path) -> None:
    for name in ("model.safetensors", "config.json", "pdqkit_lineage.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.parametrize("sig,at,ckpt_every", [(signal.SIGINT, 4, 0), (signal.SIGTERM, 2, 3),
                                               (signal.SIGTERM, STEPS - 1, 0)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_finishes_the_same(
        pair, reference, tmp_path, monkeypatch, capfd, sig, at, ckpt_every):
    """Stopped after step ``at + 1`` (with a periodic checkpoint at that very step too, and after the last step,
    before the output is written): exit 130, one line naming the checkpoint and --resume, no output; the resumed
    run's bytes are the uninterrupted run's, and its JSON log reads like one run's."""
    out, ckpt, log = tmp_path / "o", tmp_path / "o-ckpt", tmp_path / "log.jsonl"
    args = [str(a) for a in _args(pair, out, "--ckpt-every", ckpt_every, "--log-json", log)]
    _signals_during(monkeypatch, {at: [sig]})
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    capfd.readouterr()
    assert distill_main(args) == 130
    err = capfd.readouterr().err.splitlines()
    name = signal.Signals(sig).name
    assert err == [f"distill: {name}: stopping after this step to write a training checkpoint (again to stop at "
                   f"once, without one)",
                   f"distill: interrupted ({name}) after step {at + 1}/{STEPS}: training checkpoint written to "
                   f"{ckpt / f'step-{at + 1:08d}'}; run the same command with --resume to continue"]
    assert not out.exists()
    assert (ckpt / "latest").read_text().strip() == f"step-{at + 1:08d}"
    meta = json.loads((ckpt / f"step-{at + 1:08d}" / "meta.json").read_text())
    assert meta["step"] == at + 1 and set(meta["models_sha256"]) == {"teacher", "student", "tokenizer"}
    assert [json.loads(r)["event"] for r in log.read_text().splitlines()][-1] == "stopped"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # put back

    monkeypatch.undo()
    assert distill_main(args + ["--resume"]) == 0
    assert f"resume: continuing from {ckpt / f'step-{at + 1:08d}'} (step {at + 1}/{STEPS})" in capfd.readouterr().out
    _same_output(out, reference)
    assert not ckpt.exists()
    events = [json.loads(r) for r in log.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    assert "stopped" not in {e["event"] for e in events}


def test_a_second_signal_stops_at_once_and_names_the_newest_checkpoint(pair, tmp_path, monkeypatch, capfd):
    """A second signal REPEAT_S after the first: no checkpoint for the step, exit 130, the newest periodic one
    named. Without any checkpoint: only that nothing was written."""
    monkeypatch.setattr(stop, "REPEAT_S", 0.0)
    out, ckpt = tmp_path / "o", tmp_path / "o-ckpt"
    _signals_during(monkeypatch, {4: [signal.SIGINT, signal.SIGTERM]})
    capfd.readouterr()
    assert distill_main([str(a) for a in _args(pair, out, "--ckpt-every", 2)]) == 130
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == (f"distill: error: interrupted; nothing was written; the newest training checkpoint is "
                       f"{ckpt / 'step-00000004'}: --resume continues from it")
    assert len(err) == 2 and not out.exists()
    assert (ckpt / "latest").read_text().strip() == "step-00000004"

    out2 = tmp_path / "o2"
    assert distill_main([str(a) for a in _args(pair, out2)]) == 130
    assert capfd.readouterr().err.splitlines()[-1] == "distill: error: interrupted; nothing was written"
    assert not out2.exists() and not (tmp_path / "o2-ckpt").exists()


def test_a_repeat_within_repeat_s_is_the_same_request(pair, reference, tmp_path, monkeypatch, capfd):
    """Two signals at once (torchrun forwarding the terminal's Ctrl-C to a worker that had it already): one stop,
    with its checkpoint."""
    monkeypatch.setattr(stop, "REPEAT_S", 60.0)
    out, ckpt = tmp_path / "o", tmp_path / "o-ckpt"
    _signals_during(monkeypatch, {3: [signal.SIGINT, signal.SIGINT, signal.SIGTERM]})
    args = [str(a) for a in _args(pair, out)]
    assert distill_main(args) == 130
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    monkeypatch.undo()
    assert distill_main(args + ["--resume"]) == 0
    _same_output(out, reference)


def test_a_checkpoint_that_cannot_be_written_is_said(pair, tmp_path, monkeypatch, capfd):
    out = tmp_path / "o"
    (tmp_path / "file").write_text("")
    _signals_during(monkeypatch, {1: [signal.SIGINT]})
    capfd.readouterr()
    assert distill_main([str(a) for a in _args(pair, out, "--ckpt-dir", tmp_path / "file" / "ck")]) == 130
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("distill: interrupted (SIGINT) after step 2/8, and its training "
                                               "checkpoint could not be written (")
    assert err[1].endswith("; nothing was written") and not out.exists()


def test_a_signal_while_the_models_load_stops_at_once(pair, tmp_path, monkeypatch, capfd):
    """Before the steps (and after them, while the output is written) there is nothing to checkpoint: the run stops
    at once, as pack.quantize and prune do."""
    real = train.load_model

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "load_model", load)
    capfd.readouterr()
    assert distill_main([str(a) for a in _args(pair, tmp_path / "o")]) == 130
    assert capfd.readouterr().err == "distill: error: interrupted; nothing was written\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("when", ["syncing", "cleaning up"])
def test_a_signal_once_the_output_is_in_place_says_it_was_written(pair, reference, tmp_path, monkeypatch, capfd,
                                                                  when):
    """SIGTERM while the output's rename is synced, or while the training checkpoints are deleted after it: exit
    130 saying OUT was written (before: "nothing was written; --resume continues", which OUT's existence then
    refused). OUT is the uninterrupted run's."""
    import pack.checkpoint as pc

    out = tmp_path / "o"
    if when == "syncing":
        real = pc.fsync_dir

        def fsync_dir(d):
            if out.is_dir() and Path(d) == out.parent:   # after the rename: the output is in place
                os.kill(os.getpid(), signal.SIGTERM)
            return real(d)
        monkeypatch.setattr(pc, "fsync_dir", fsync_dir)
        said = f"{out} was written; interrupted while syncing it to disk"
    else:
        real_clear = train.clear_checkpoints

        def clear(d):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_clear(d)
        monkeypatch.setattr(train, "clear_checkpoints", clear)
        said = (f"{out} was written; interrupted while cleaning up after it; the training checkpoints in "
                f"{tmp_path / 'o-ckpt'} may remain (delete them)")
    capfd.readouterr()
    assert distill_main([str(a) for a in _args(pair, out, "--ckpt-every", 3)]) == 130
    err = capfd.readouterr().err
    assert err.startswith(f"distill: error: interrupted: {said}") and err.count("\n") == 1, err
    _same_output(out, reference)


def test_resume_refuses_a_checkpoint_that_trained_other_parameters(pair, tmp_path, capfd):
    """Same settings, another choice of trained parameters (another pdqkit version: before the forty-fourth session
    --train-embeddings left an untied lm_head frozen): one line, not a load error blaming damage."""
    out, ckpt = tmp_path / "o", tmp_path / "o-ckpt"
    args = [str(a) for a in _args(pair, out, "--ckpt-every", 2, "--steps", 3)]
    args[args.index("--steps") + 1] = "4"
    assert distill_main(args + ["--keep-ckpt"]) == 0
    meta_f = ckpt / "step-00000002" / "meta.json"
    meta = json.loads(meta_f.read_text())
    assert meta["trainable"] and all(isinstance(n, str) for n in meta["trainable"])
    meta["trainable"] = meta["trainable"][:-1]
    meta_f.write_text(json.dumps(meta))
    capfd.readouterr()
    assert distill_main(args + ["--resume", "--force"]) == 2
    err = capfd.readouterr().err
    assert "checkpoint trained other parameters than this run would" in err and err.count("\n") == 1, err


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return sorted(out)


def _torchrun(port_args: list, *args) -> list[str]:
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--nproc-per-node", "2", *port_args, "-m", "distill", *map(str, args)]


TORCHRUN_STEPS = 20


def _port() -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ["--master-addr", "127.0.0.1", "--master-port", str(s.getsockname()[1])]


def _torchrun_common(pair) -> list:
    common = _args(pair, "unused", "--log-every", 1)
    common = common[:common.index("-o")] + common[common.index("-o") + 2:]
    common[common.index("--steps") + 1] = TORCHRUN_STEPS
    return common


def _torchrun_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def torchrun_reference(pair, tmp_path_factory):
    """An uninterrupted 2-rank run's output."""
    ref = tmp_path_factory.mktemp("distill_stop_torchrun") / "ref"
    res = subprocess.run(_torchrun(_port(), *_torchrun_common(pair), "-o", ref), env=_torchrun_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return ref


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
@pytest.mark.parametrize("who", ["one worker", "torchrun"])
def test_torchrun_a_signal_stops_both_ranks_at_the_same_step(pair, torchrun_reference, tmp_path, who):
    """SIGTERM to one worker only (``kill`` of one rank): both ranks stop after the same step (the per-step
    all-reduce) and write one checkpoint together. SIGINT to torchrun itself (a terminal's Ctrl-C: torchrun starts
    its workers in sessions of their own, and forwards the signal to them): the same, within its shutdown timeout
    (30 s). Then --resume under torchrun writes the uninterrupted run's bytes."""
    common, env, out = _torchrun_common(pair), _torchrun_env(), tmp_path / "o"
    proc = subprocess.Popen(_torchrun(_port(), *common, "-o", out), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        for line in proc.stdout:   # rank 0's step lines
            if line.startswith("step 3/"):
                break
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        if who == "one worker":
            os.kill(workers[-1], signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)   # (ranks that disagree wait in a collective until killed)
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode != 0
    ck = (tmp_path / "o-ckpt" / "latest").read_text().strip()
    stopped = int(ck.removeprefix("step-"))
    assert 3 <= stopped < TORCHRUN_STEPS, "the run finished before the signal"
    assert f"after step {stopped}/{TORCHRUN_STEPS}: training checkpoint written to" in err
    if who == "torchrun":   # rank 0 had the signal: its announcement says what torchrun does next
        assert "torchrun SIGKILLs the workers after its --shutdown-timeout" in err
    assert json.loads((tmp_path / "o-ckpt" / ck / "meta.json").read_text())["world"] == 2
    assert not out.exists()

    res = subprocess.run(_torchrun(_port(), *common, "-o", out, "--resume"), env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"(step {stopped}/{TORCHRUN_STEPS})" in res.stdout
    _same_output(out, torchrun_reference)
    assert read_lineage(out)[-1]["world_size"] == 2


@pytest.mark.gpu
def test_cuda_phase2_stop_then_resume_is_byte_identical_with_deterministic_kernels(pair, tmp_path):
    """On CUDA (bf16-mixed) with --deterministic, phase 2 (continuations sampled on the GPU from the checkpointed
    RNG state), as separate processes (cuBLAS reads its workspace setting once per process): SIGTERM after step 3,
    then --resume, writes the uninterrupted run's bytes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    steps = 16
    common = _args(pair, "unused", "--device", "cuda", "--deterministic", "--phase", 2, "--max-new-tokens", 16,
                   "--lmbda", 1.0, "--log-every", 1)
    common = common[:common.index("-o")] + common[common.index("-o") + 2:]
    common[common.index("--steps") + 1] = steps
    cli = [sys.executable, "-m", "distill", *map(str, common)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ref, out = tmp_path / "ref", tmp_path / "o"
    res = subprocess.run(cli + ["-o", str(ref)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(cli + ["-o", str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    stopped = int((tmp_path / "o-ckpt" / "latest").read_text().strip().removeprefix("step-"))
    assert 3 <= stopped < steps and f"after step {stopped}/{steps}: training checkpoint written" in err
    res = subprocess.run(cli + ["-o", str(out), "--resume"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_output(out, ref)
