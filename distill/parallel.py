"""One process or many: process-group set-up, FSDP2 sharding of the student, small collectives.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) every rank loads the frozen bf16 teacher whole
(replicated: it only runs forward, no optimizer state) and the student is sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``): each decoder layer is its own unit, the :class:`DistillModule` root
owns the rest (embeddings, tied ``lm_head``, final norm). On CUDA parameters are all-gathered in bf16 and
gradients reduce-scattered in fp32 (``MixedPrecisionPolicy``); on CPU (gloo, used by the tests) everything is
fp32. A single process uses no process group: plain module, ``torch.autocast`` for bf16 on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init", "shard_student", "all_reduce_sum", "gather_float", "barrier", "shutdown", "fsdp_modules"]


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_dist(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistEnv:
    """Resolve ``device`` (auto/cpu/cuda/cuda:N) and, under torchrun, join the process group
    (NCCL on CUDA, gloo on CPU; ``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device == "cuda":  # an explicit index: torch.cuda.set_device (and NCCL's device_id) refuse a bare "cuda"
        device = f"cuda:{local_rank}" if world > 1 else f"cuda:{torch.cuda.current_device()}"
    elif device.startswith("cuda:") and world > 1 and torch.device(device).index != local_rank:
        raise ValueError(f"--device {device} under torchrun: every rank would use that one GPU; pass --device cuda "
                         f"(rank r takes cuda:LOCAL_RANK) or set CUDA_VISIBLE_DEVICES")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank, world, local_rank, dev)


def shard_student(module: torch.nn.Module, layers, env: DistEnv, bf16_params: bool) -> None:
    """FSDP2: ``fully_shard`` every decoder layer, then ``module`` (the root) — in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world,))
    # inputs are not cast: the loss weights passed to the root must stay fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_params else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)


def fsdp_modules(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_dist:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_float(x: float, env: DistEnv) -> list[float]:
    """``x`` from every rank, in rank order (one process: ``[x]``)."""
    if not env.is_dist:
        return [float(x)]
    out = [None] * env.world
    dist.all_gather_object(out, float(x))
    return [float(v) for v in out]


def barrier(env: DistEnv) -> None:
    if env.is_dist:
        dist.barrier()


def shutdown(env: DistEnv, ok: bool = True) -> None:
    """Leave the process group: after a barrier when the run succeeded; without one when it failed (the failure may
    be this rank's alone, and the others, inside a collective, would never reach the barrier: every rank would
    wait until the process group's timeout and the error would never be printed)."""
    if env.is_dist and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
