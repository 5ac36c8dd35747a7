"""Toy teacher/student pairs for tests and benchmarks: a bench-factory model and a copy of it whose MLPs keep
only their first ``width`` channels (what a structural prune does, minus the importance ranking)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["slice_mlp", "save_pair"]


def slice_mlp(teacher, width: int, multimodal: bool, scale: str, **overrides):
    """A model of ``scale`` whose every MLP is ``teacher``'s first ``width`` channels (other weights copied);
    ``overrides``: the config fields ``teacher`` was built with beyond ``scale``'s."""
    from bench.factory import build_model

    student = build_model(scale, multimodal, dtype=torch.float32, **{**overrides, "intermediate_size": width})
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            v = v[:width]
        elif k.endswith("mlp.down_proj.weight"):
            v = v[:, :width]
        sd[k] = v
    student.load_state_dict(sd, strict=True)
    return student.to(teacher.dtype)


def save_pair(root: str | Path, scale: str = "micro", width: int = 512, multimodal: bool = False, seed: int = 0,
              tokenizer=None, **overrides) -> tuple[Path, Path]:
    """Write ``root/teacher`` (random ``scale`` model; ``overrides`` replace config fields, e.g.
    ``global_head_dim``) and ``root/student`` (its MLPs sliced to ``width``)."""
    from bench.factory import build_model
    from pack.checkpoint import lineage_step, save_bf16_checkpoint

    root = Path(root)
    teacher = build_model(scale, multimodal, seed, **overrides)
    t = save_bf16_checkpoint(teacher, root / "teacher", tokenizer=tokenizer,
                             step=lineage_step("base", model=f"toy/{scale}", init="random", seed=seed))
    student = slice_mlp(teacher, width, multimodal, scale, **overrides)
    s = save_bf16_checkpoint(student, root / "student", source_dir=t,
                             step=lineage_step("prune", method="slice-first", intermediate_size=width))
    return t, s
