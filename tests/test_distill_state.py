"""Training checkpoints (distill/state.py) at the function level, with a tiny module and AdamW in one process:
a step dir left complete by a killed run is replaced when that step is saved again, ``latest`` and
latest_checkpoint pick the right step dir, and clear_checkpoints deletes only what save_checkpoint writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distill.parallel import DistEnv
from distill.state import LATEST, clear_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint

ENV = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def _trained(seed: int, steps: int = 1):
    """(module, AdamW) after ``steps`` optimizer steps from a seed-dependent start: distinct weights and moments."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(model, opt) -> dict:
    """Every tensor of the module and the optimizer state, cloned (what a checkpoint must restore exactly)."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def _loaded(path) -> tuple[dict, dict]:
    """(snapshot, meta) of a fresh module + AdamW (other weights, no moments) loaded from step dir ``path``."""
    model, opt = _trained(seed=999)
    meta = load_checkpoint(path, model, opt, ENV)
    return _snapshot(model, opt), meta


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _latest_name(ck: Path) -> str:
    return (ck / LATEST).read_text().strip()


def test_saving_a_step_again_replaces_the_complete_dir_a_killed_run_left(tmp_path):
    """A run killed after renaming step-2 into place but before `latest` named it leaves a complete step-2 beside
    `latest` -> step-1. --resume must take step-1 (what `latest` names, not the newer dir); the resumed run's own
    save of step 2 replaces the stale dir whole (nothing of it survives, not even files the new save does not write)
    and then `latest` names step 2, the only step dir left, which loads the resumed run's state."""
    ck, killed = tmp_path / "ck", tmp_path / "killed"
    m1, o1 = _trained(seed=1)
    save_checkpoint(ck, 1, m1, o1, ENV, {"run": "first"})
    state1 = _snapshot(m1, o1)
    draws1 = torch.rand(5)   # what the run draws next: the RNG state saved with step 1 must give it again

    # the killed run: it continued from step 1 on its own and got step-2 renamed into place, `latest` not updated
    stale_m, stale_o = _trained(seed=2, steps=2)
    stale = save_checkpoint(killed, 2, stale_m, stale_o, ENV, {"run": "killed"})
    shutil.copytree(stale, ck / stale.name)
    (ck / stale.name / "rng-rank1.pt").write_bytes(b"from a run of another world")   # not written by the new save
    assert _latest_name(ck) == "step-00000001"

    ck1 = latest_checkpoint(ck)
    assert ck1 == ck / "step-00000001"
    got, meta = _loaded(ck1)
    _assert_same(got, state1)
    assert torch.equal(torch.rand(5), draws1)
    assert (meta["step"], meta["run"], meta["world"]) == (1, "first", 1)

    m3, o3 = _trained(seed=3, steps=2)   # the resumed run's state after its step 2 (differs from the stale one)
    new, old = _snapshot(m3, o3), _snapshot(stale_m, stale_o)
    assert all(not torch.equal(new[k], old[k]) for k in new if k.startswith("model."))
    path = save_checkpoint(ck, 2, m3, o3, ENV, {"run": "resumed"})

    assert path == ck / "step-00000002" and _latest_name(ck) == "step-00000002"
    assert sorted(p.name for p in ck.iterdir()) == [LATEST, "step-00000002"]   # step-1, temp dirs gone
    assert not (path / "rng-rank1.pt").exists()
    assert latest_checkpoint(ck) == path
    got, meta = _loaded(path)
    _assert_same(got, _snapshot(m3, o3))
    assert (meta["step"], meta["run"]) == (2, "resumed")
    assert json.loads((path / "meta.json").read_text())["run"] == "resumed"


def test_latest_checkpoint_picks_the_named_or_the_newest_complete_dir(tmp_path):
    """With `latest`: the step dir it names, if complete (has meta.json), else None. Without `latest` (killed
    between the rename and writing it): the numerically newest complete step dir — step 10 after step 9 — ignoring
    incomplete ones and temp dirs."""
    ck = tmp_path / "ck"
    assert latest_checkpoint(ck) is None
    m, o = _trained(seed=1)
    save_checkpoint(ck, 9, m, o, ENV, {})
    step9 = ck / "step-00000009"
    keep = tmp_path / "keep9"
    shutil.copytree(step9, keep)
    save_checkpoint(ck, 10, m, o, ENV, {})   # deletes step 9
    shutil.copytree(keep, step9)
    step10 = ck / "step-00000010"
    assert latest_checkpoint(ck) == step10

    (ck / LATEST).write_text("step-00000009\n")   # `latest` is trusted over the newer dir
    assert latest_checkpoint(ck) == step9
    (ck / LATEST).write_text("step-00000042\n")   # names nothing complete
    assert latest_checkpoint(ck) is None

    (ck / LATEST).unlink()
    assert latest_checkpoint(ck) == step10
    (ck / "step-00000011").mkdir()                 # incomplete: no meta.json
    (ck / ".step-00000012.tmp").mkdir()
    (ck / ".step-00000012.tmp" / "meta.json").write_text("{}")
    assert latest_checkpoint(ck) == step10
    (step10 / "meta.json").unlink()
    assert latest_checkpoint(ck) == step9


def test_save_keeps_only_the_newest_step(tmp_path):
    """A kill after `latest` was replaced but before the older dirs were deleted leaves two complete step dirs, and
    a kill mid-write leaves the next step's temp dir; the next save of that step starts the temp dir afresh (none of
    the killed write's files end up in the step dir) and leaves only its own step dir (and `latest` naming it)."""
    ck = tmp_path / "ck"
    m, o = _trained(seed=1)
    for step in (1, 2):
        save_checkpoint(ck, step, m, o, ENV, {})
    shutil.copytree(ck / "step-00000002", ck / "step-00000001")
    (ck / ".step-00000003.tmp").mkdir()
    (ck / ".step-00000003.tmp" / "rng-rank1.pt").write_bytes(b"half-written by the killed save")
    save_checkpoint(ck, 3, m, o, ENV, {})
    assert sorted(p.name for p in ck.iterdir()) == [LATEST, "step-00000003"]
    assert not (ck / "step-00000003" / "rng-rank1.pt").exists()
    assert _latest_name(ck) == "step-00000003"


def test_clear_checkpoints_removes_only_its_own_files(tmp_path):
    """clear_checkpoints deletes step dirs, their temp dirs, `latest` and its temp file; a user's files and folders
    in the directory stay, and so does the directory. Holding only its own files, the directory itself goes."""
    ck = tmp_path / "ck"
    m, o = _trained(seed=1)
    save_checkpoint(ck, 1, m, o, ENV, {})
    (ck / "step-00000002").mkdir()                       # an incomplete step dir
    (ck / ".step-00000003.tmp").mkdir()                  # a save killed mid-write
    (ck / ".step-00000003.tmp" / "meta.json").write_text("{}")
    (ck / f".{LATEST}.tmp").write_text("step-00000003\n")
    foreign = {"notes.txt": b"mine", "latest.bak": b"step-00000001\n", ".hidden": b"h", "mystep-1": b"x"}
    for name, data in foreign.items():
        (ck / name).write_bytes(data)
    for name in ("step-notes", "step-1", ".step-notes.tmp"):   # the user's: not save_checkpoint's names
        (ck / name).mkdir()
        (ck / name / "meta.json").write_text("{}")
    (ck / "sub").mkdir()
    (ck / "sub" / "step-00000001").mkdir()               # a step-like name one level down is not ours
    (ck / "sub" / "step-00000001" / "meta.json").write_text("{}")

    clear_checkpoints(ck)
    users = ["sub", "step-notes", "step-1", ".step-notes.tmp"]
    assert sorted(p.name for p in ck.iterdir()) == sorted([*foreign, *users])
    assert {n: (ck / n).read_bytes() for n in foreign} == foreign
    assert (ck / "sub" / "step-00000001" / "meta.json").read_text() == "{}"

    only_ours = tmp_path / "only"
    save_checkpoint(only_ours, 1, m, o, ENV, {})
    (only_ours / ".step-00000002.tmp").mkdir()
    clear_checkpoints(only_ours)
    assert not only_ours.exists()
    clear_checkpoints(tmp_path / "missing")   # nothing there: nothing to do
    assert not (tmp_path / "missing").exists()
