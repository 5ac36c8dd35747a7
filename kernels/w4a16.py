"""pdqkit's fast W4A16 GEMM: validation and the dispatcher by M (one screen).

``y = x @ W'^T (+ bias)``, ``W' = RN_dtype((q - 8) * s)`` read straight from a compressed-tensors pack-quantized
Linear: see :func:`w4a16_gemm` for the contract. Decode-sized M goes to the tensor-core GEMVs (up to 16 rows) or
the split-K kernel, prefill-sized M to the tiled wgmma kernel (or dequantize + cuBLAS), as the per-GPU tuned table
says (:mod:`kernels.w4a16_config`).
"""
from __future__ import annotations

import functools

import torch

from .env import census_enabled, interpreting
from .w4a16_config import GEMV_KERNELS, W4A16Config, select_config

_DTYPES = (torch.bfloat16, torch.float16)

# The launch census, on when $PDQKIT_W4A16_CENSUS is set as this module is imported (else None: one test per call).
# A serving engine's log names only vLLM's layer class; this says which of our kernels ran, on which shapes and M.
_CENSUS: dict | None = {} if census_enabled() else None


def census(reset: bool = False) -> dict[str, dict]:
    """What :func:`w4a16_gemm` ran since the census began or was last reset: ``{"<kernel> NxK [<config>]": {"calls",
    "m_min", "m_max"}}``, where ``<kernel>`` is the kernel that actually ran after the dispatcher's fallbacks (e.g.
    ``prefill`` for a ``prefill_wsp`` entry on unaligned operands) or ``reference`` (the pure-torch path), and
    ``<config>`` the launch the table or heuristic chose (:meth:`W4A16Config.brief`; ``fallback for ...`` when
    another kernel ran it). Under CUDA graphs it counts captures, not replays. ``{}`` when ``$PDQKIT_W4A16_CENSUS``
    was not set at import."""
    if _CENSUS is None:
        return {}
    snap = {key: dict(v) for key, v in _CENSUS.items()}
    if reset:
        _CENSUS.clear()
    return snap


def _count(ran: str, m: int, n: int, k: int, asked: W4A16Config | None) -> None:
    if asked is None:
        key = f"{ran} {n}x{k}"
    elif asked.kernel == ran:
        key = f"{ran} {n}x{k} [{asked.brief()}]"
    else:
        key = f"{ran} {n}x{k} [fallback for {asked.brief()}]"
    e = _CENSUS.setdefault(key, {"calls": 0, "m_min": m, "m_max": m})
    e["calls"] += 1
    e["m_min"], e["m_max"] = min(e["m_min"], m), max(e["m_max"], m)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def asm_ok(x: torch.Tensor) -> bool:
    """Whether the inline-PTX dequantization can run for ``x``: fp16 anywhere; bf16 needs sm_90 (``sub.bf16x2`` /
    ``mul.bf16x2`` are Hopper instructions; ptxas refuses them for sm_80/sm_89), else the plain-Triton path."""
    if x.dtype == torch.float16:
        return True
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def mma_ok(x: torch.Tensor) -> bool:
    """Whether the tensor-core GEMVs (:mod:`kernels.w4a16_gemv_mma`, ``_mma8``) can run for ``x``: their inline PTX
    dequantization (:func:`asm_ok`) and ``mma.sync.m16n8k16``, an sm_80 instruction (sm_75 has only m16n8k8), so
    fp16 on a Turing GPU takes the CUDA-core GEMV instead of failing in ptxas."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return asm_ok(x) and _capability(index) >= (8, 0)


def tma_ok(x: torch.Tensor, weight_packed: torch.Tensor) -> bool:
    """Whether the Gluon prefill kernels (:mod:`kernels.w4a16_prefill_tma`, ``_wsp``) can run: Hopper (wgmma and
    TMA are sm_90 instructions; sm_100 has neither wgmma nor this code path), the inline-PTX dequantization
    (:func:`asm_ok`), Triton's Gluon, and TMA's 16-byte alignment of both operands' base addresses (their contiguous
    rows are multiples of 16 bytes already: :func:`check_w4a16_args` requires K % 128 == 0)."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if _capability(index)[0] != 9 or not asm_ok(x) or not _gluon_available():
        return False
    return x.data_ptr() % 16 == 0 and weight_packed.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _gluon_available() -> bool:
    try:
        from . import w4a16_prefill_tma, w4a16_prefill_wsp  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def shape_supported(n: int, k: int) -> bool:
    """N and K the kernels tile: positive, ``N % 64 == 0`` and ``K % 128 == 0``."""
    return n > 0 and k > 0 and n % 64 == 0 and k % 128 == 0


def group_supported(group: int, k: int) -> bool:
    """Scale group sizes the tiles (BLOCK_K 64 / 128) run: whole groups in a tile or a tile inside one group, i.e.
    32, 64, a multiple of 128, or channelwise (``group == k``)."""
    return group == k or group in (32, 64) or (group > 0 and group % 128 == 0)


def check_w4a16_args(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, name: str = "w4a16_gemm",
                     any_n: bool = False) -> tuple[int, int, int]:
    """Validate the operands of :func:`w4a16_gemm` (or of the launcher ``name``); returns ``(N, K, group_size)`` or
    raises ``ValueError``. ``any_n``: N need not be a multiple of 64 (a launcher that masks ragged N)."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: x must be bfloat16 or float16, got {x.dtype}")
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(f"{name}: weight_packed must be int32 [N, K/8], got {weight_packed.dtype} "
                         f"{tuple(weight_packed.shape)}")
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: x's last dim {tuple(x.shape)[-1:]} != K = 8 * weight_packed.shape[1] = {k}")
    if not (shape_supported(n, k) or any_n and shape_supported(64 * n, k)):
        rule = "K % 128 == 0" if any_n else "N % 64 == 0 and K % 128 == 0"
        raise ValueError(f"{name}: need N and K positive, {rule}, got N={n}, K={k} "
                         "(pad the Linear or keep it in bf16)")
    if weight_scale.dim() != 2 or weight_scale.shape[0] != n or not weight_scale.shape[1] or k % weight_scale.shape[1]:
        raise ValueError(f"{name}: weight_scale must be [N={n}, K/G] with G dividing K={k}, got "
                         f"{tuple(weight_scale.shape)}")
    if weight_scale.dtype != x.dtype:
        raise ValueError(f"{name}: weight_scale dtype {weight_scale.dtype} != x dtype {x.dtype}; convert the "
                         "scales once at load time (weight_scale.to(x.dtype))")
    group = k // weight_scale.shape[1]
    if not group_supported(group, k):
        raise ValueError(f"{name}: group size {group} unsupported (need 32, 64, a multiple of 128, or "
                         "channelwise)")
    if not (weight_packed.is_contiguous() and weight_scale.is_contiguous()):
        raise ValueError(f"{name}: weight_packed and weight_scale must be contiguous (make them so at load time)")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"{name}: bias must be [{n}] of {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    devs = {t.device for t in (x, weight_packed, weight_scale, bias) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{name}: operands on different devices: {sorted(map(str, devs))}")
    return n, k, group


def w4a16_reference(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch reference: :func:`pack.packing.dequantize` -> fp32 matmul (+ bias) -> one rounding to x.dtype."""
    from pack.packing import dequantize

    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    w = dequantize(weight_packed, weight_scale, (n, k)).float()
    y = x.reshape(-1, k).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def on_operand_gpu(fn):
    """Decorate an op ``fn(x, ...)`` so that it runs with ``x``'s GPU as the current device.

    Triton launches on the CURRENT device and its current stream, not on the operands' device: a model on cuda:1
    (or spread over GPUs by ``device_map``) would fail Triton's pointer check, or with peer access run on another
    GPU's stream, unordered with the work around it. One ``current_device`` lookup per call otherwise."""
    @functools.wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs):
        if x.device.type == "cuda" and x.device.index is not None and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return run


@on_operand_gpu
def w4a16_gemm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, config: W4A16Config | None = None) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W'^T (+ bias)`` — see :func:`kernels.ops.w4a16_gemm` for the full contract.

    ``config`` forces a launch configuration (tests, tuning); otherwise the tuned table / heuristic decides by M.
    CPU tensors run the pure-torch reference unless ``TRITON_INTERPRET=1`` (then the Triton kernels are interpreted).
    """
    n, k, group = check_w4a16_args(x, weight_packed, weight_scale, bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    interp = interpreting()
    if x.device.type != "cuda" and not interp:
        if _CENSUS is not None:
            _count("reference", m, n, k, None)
        return w4a16_reference(x, weight_packed, weight_scale, bias)
    x2 = x2.contiguous()
    kw = dict(use_asm=not interp and asm_ok(x))
    mma = kw["use_asm"] and mma_ok(x)
    if config is None:
        if interp:
            name, sms = "interpreter", 4
        else:
            props = torch.cuda.get_device_properties(x.device)
            name, sms = props.name, props.multi_processor_count
        # untuned shapes get the tensor-core GEMV at M <= 2 only where its inline PTX runs (the CUDA-core fallback
        # was not measured against split-K off the H200)
        config = select_config(m, n, k, group, name, sms, gemv=mma,
                               tma=not interp and 32 < m < 1024 and tma_ok(x2, weight_packed))
    c = config
    if c.kernel != "dequant_mm" and not c.fits(k, group):
        raise ValueError(f"w4a16_gemm: config {c} cannot run K={k} with group size {group} (block_k must divide K "
                         "and hold whole groups or lie inside one)")
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias[cols] without a stride
    ran = c.kernel
    if c.kernel == "decode":
        from .w4a16_decode import w4a16_decode
        y = w4a16_decode(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                         block_k=c.block_k, split_k=c.split_k, num_warps=c.num_warps, num_stages=c.num_stages,
                         kperm=c.kperm, w_is_a=c.w_is_a, dot_f32=interp, **kw)
    elif c.kernel == "gemv_mma" and mma:
        from .w4a16_gemv_mma import w4a16_gemv_mma
        y = w4a16_gemv_mma(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                           block_k=c.block_k, num_warps=c.num_warps, prefetch=c.num_stages - 1, chain=c.chain,
                           split_k=c.split_k)
    elif c.kernel == "gemv_mma8" and mma and weight_packed.data_ptr() % 16 == 0:
        from .w4a16_gemv_mma8 import w4a16_gemv_mma8
        y = w4a16_gemv_mma8(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                            block_k=c.block_k, num_warps=c.num_warps, prefetch=c.num_stages - 1, chain=c.chain,
                            split_k=c.split_k)
    elif c.kernel in GEMV_KERNELS:
        # the MMA GEMVs without inline PTX (interpreter, bf16 before sm_90) or mma.sync.m16n8k16 (before sm_80)
        # or, for gemv_mma8, on a weight tensor
        # off a 16-byte boundary (its word layout needs the alignment): the same tiling on FMAs (<= 8 rows a program)
        ran = "gemv"
        from .w4a16_gemv import w4a16_gemv
        y = w4a16_gemv(x2, weight_packed, weight_scale, bias, group, block_m=min(8, c.block_m), block_n=c.block_n,
                       block_k=c.block_k, num_warps=c.num_warps, prefetch=c.num_stages - 1, split_k=c.split_k,
                       emu_rn=interp, **kw)
    elif c.kernel == "prefill_tma" and not interp and tma_ok(x2, weight_packed):
        from .w4a16_prefill_tma import w4a16_prefill_tma
        y = w4a16_prefill_tma(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                             block_k=c.block_k, num_stages=c.num_stages, group_m=c.group_m, split_k=c.split_k)
    elif c.kernel == "prefill_wsp" and not interp and tma_ok(x2, weight_packed):
        from .w4a16_prefill_wsp import w4a16_prefill_wsp
        y = w4a16_prefill_wsp(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                              block_k=c.block_k, num_stages=c.num_stages, group_m=c.group_m, split_k=c.split_k,
                              stream_k=c.stream_k)
    elif c.kernel in ("prefill", "prefill_tma", "prefill_wsp"):
        # the Gluon kernels off Hopper, without Gluon, under the interpreter or on unaligned operands: the
        # Triton-language tiled kernel (its usual 128-wide weight tile; 8 warps for 128 activation rows)
        if c.kernel != "prefill":
            ran = "prefill"
            c = W4A16Config("prefill", block_m=min(c.block_m, 128), block_n=128, block_k=64,
                            num_warps=8 if c.block_m >= 128 else 4, num_stages=3, group_m=c.group_m)
        from .w4a16_prefill import w4a16_prefill
        y = w4a16_prefill(x2, weight_packed, weight_scale, bias, group, block_m=c.block_m, block_n=c.block_n,
                          block_k=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages, kperm=c.kperm,
                          w_is_a=c.w_is_a, group_m=c.group_m, dot_f32=interp, **kw)
    else:
        ran = "dequant_mm"
        from .w4a16_dequant import w4a16_dequant_mm
        y = w4a16_dequant_mm(x2, weight_packed, weight_scale, bias, group, **kw)
    if _CENSUS is not None:
        _count(ran, m, n, k, config)
    return y.reshape(*x.shape[:-1], n)
