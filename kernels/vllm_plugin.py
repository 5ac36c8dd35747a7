"""vLLM plugin: serve pdqkit W4A16 checkpoints on pdqkit's own Triton kernels.

How it plugs in
---------------
pdqkit declares an entry point in the ``vllm.general_plugins`` group (pyproject.toml)::

    [project.entry-points."vllm.general_plugins"]
    pdqkit = "kernels.vllm_plugin:register"

vLLM 0.26.0 calls :func:`register` once in every process it starts (front end, engine core, workers;
``vllm/plugins/__init__.py::load_general_plugins``), before any model is built. Which kernel runs is an
explicit choice, made with one environment variable::

    PDQKIT_VLLM_KERNEL=fast    pdqkit's fast Triton W4A16 GEMM       (torch op ``pdqkit::w4a16_gemm``)
    PDQKIT_VLLM_KERNEL=exact   the marlin-order kernel, bit-identical  (torch op ``pdqkit::w4a16_gemm_exact``)
                               to vLLM's Marlin (tokens and logprobs)
    unset                      nothing is registered: vLLM picks its own kernel exactly as without pdqkit

With a kernel chosen, its class is registered with vLLM's mixed-precision linear kernel registry
(``vllm.model_executor.kernels.linear.register_linear_kernel(cls, PlatformEnum.CUDA, "mp")``) and moved to the
FRONT of the CUDA list, so ``choose_mp_linear_kernel`` tries it before CutlassW4A8/Machete/Marlin/... for every
layer vLLM routes through that registry: ``CompressedTensorsWNA16`` (what pdqkit writes, and what is tested), but
also other symmetric uint4b8 methods that use it, such as GPTQ-Marlin checkpoints without act-order (same
arithmetic after vLLM's own layout permutation; not tested end to end). ``can_implement`` says exactly what it
covers (:func:`coverage`); any other layer falls through to vLLM's next kernel, and the reason is logged (vLLM
itself logs reasons only when *no* kernel fits). On a platform the kernels cannot serve at all (not CUDA, or a
GPU below sm_80) :func:`register` registers nothing and logs a warning (:func:`platform_refusal`). vLLM then
logs ``Using PdqkitFastLinearKernel for CompressedTensorsWNA16`` (or ``...Exact...``).
``VLLM_DISABLED_KERNELS`` can name our classes too; ``--linear-backend`` other than ``auto`` filters them out.

Layout contract (what ``process_weights_after_loading`` receives)
-----------------------------------------------------------------
``CompressedTensorsWNA16.create_weights`` loads the checkpoint tensors verbatim into

* ``weight_packed``  int32 ``[N, K/8]`` (PackedvLLMParameter, output_dim=0, input_dim=1, packed_dim=1):
  compressed-tensors order, eight 4-bit codes per word along K, low nibble first, stored as ``q + 8``;
* ``weight_scale``   ``[N, K/G]`` (``[N, 1]`` channelwise) in the activation dtype;

with N = ``output_size_per_partition`` (fused qkv / gate_up shards stacked along N) and K =
``input_size_per_partition``. That is exactly what both pdqkit ops take, so no repack is needed; the
parameters are only turned into plain, contiguous ``nn.Parameter`` s (TorchDynamo wants plain parameters,
like vLLM's own kernels do).

torch.compile and CUDA graphs (vLLM's defaults) work through the torch.library ops, which have fake
(meta) implementations: Dynamo traces ``apply_weights`` into one opaque op call per layer. vLLM's AOT
compile cache key does not include environment variables it does not know, so the kernel choice is also
written into ``vllm_config.additional_config["pdqkit_vllm_kernel"]`` (hashed into the key): a graph compiled
for one kernel is never reloaded for another.

This module imports neither vLLM nor Triton at import time: :func:`register` with the variable unset costs
an environment lookup, and :func:`coverage` / :func:`selected_kernel` are testable without vLLM.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from .counters import reserve

__all__ = [
    "ENV_VAR", "CHOICES", "COMPILE_CACHE_KEY", "KERNEL_CLASS_NAMES", "selected_kernel", "coverage",
    "register", "kernel_class", "platform_refusal",
]

ENV_VAR = "PDQKIT_VLLM_KERNEL"
CHOICES = ("fast", "exact")
KERNEL_CLASS_NAMES = {"fast": "PdqkitFastLinearKernel", "exact": "PdqkitExactLinearKernel"}
COMPILE_CACHE_KEY = "pdqkit_vllm_kernel"  # key in vllm_config.additional_config (part of the compile hash)
# the torch op each choice calls, and the pdqkit module that registers it
_OPS = {"fast": ("w4a16_gemm", "kernels.ops"), "exact": ("w4a16_gemm_exact", "kernels.exact_op")}

SUPPORTED_GROUP_SIZES = (128, -1)  # group 128, or channelwise (-1)
SUPPORTED_ACT_DTYPES = (torch.bfloat16, torch.float16)
N_MULTIPLE, K_MULTIPLE = 64, 128
MIN_CAPABILITY = 80  # bf16 tensor-core MMA (sm_80+); Triton compiles both kernels there (below sm_90 the fast
# kernel dequantizes bf16 without its PTX bf16x2 instructions, which are Hopper-only: kernels.w4a16.asm_ok)

logger = logging.getLogger("pdqkit.vllm_plugin")  # replaced by vLLM's logger once vLLM is imported


def selected_kernel(environ=None) -> str | None:
    """The kernel named by ``$PDQKIT_VLLM_KERNEL`` (``"fast"`` / ``"exact"``), or None when unset/empty.

    Raises ``ValueError`` (one line, with the fix) for any other value, so a typo never silently serves on
    vLLM's kernels.
    """
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not raw:
        return None
    choice = raw.lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a pdqkit kernel: set it to one of {', '.join(CHOICES)}, "
                         f"or unset it to keep vLLM's own kernels")
    return choice


# The Inductor settings under which a compiled `exact` engine matched a compiled Marlin engine bit for bit (two H200s,
# 2026-11-29): an environment variable plus vLLM's compilation_config.inductor_compile_config. One place for the
# plugin's hint and bench/gpu/vllm_e2e_check.py's graph-det mode.
DETERMINISTIC_INDUCTOR_ENV = ("TORCHINDUCTOR_DETERMINISTIC", "1")
DETERMINISTIC_INDUCTOR_CONFIG = {"combo_kernels": False, "benchmark_combo_kernel": False}


def inductor_hint(compile_mode, backend: str, inductor_compile_config: dict | None, environ=None) -> str | None:
    """The one-line hint ``exact`` logs when vLLM compiles the model with Inductor outside its deterministic mode
    (None otherwise): the GEMM is still Marlin's bits, but on two H200s (2026-11-29) Inductor's default mode made a
    whole ``exact`` engine differ from a Marlin engine, and ``TORCHINDUCTOR_DETERMINISTIC=1`` with combo kernels
    off made them bit-identical. ``compile_mode``: vLLM's ``CompilationMode`` (0 = none, e.g. ``--enforce-eager``);
    ``backend``: ``compilation_config.backend`` ("" or "inductor" = Inductor)."""
    env = os.environ if environ is None else environ
    if int(compile_mode) == 0 or backend not in ("", "inductor"):
        return None
    var, value = DETERMINISTIC_INDUCTOR_ENV
    if env.get(var) == value and (inductor_compile_config or {}).get("combo_kernels") is False:
        return None
    return ("pdqkit: PdqkitExactLinearKernel computes Marlin's bits, but under torch.compile in Inductor's default "
            f"mode whole engines were seen to differ from a Marlin engine; with {var}={value} and "
            f"compilation_config={{'inductor_compile_config': {DETERMINISTIC_INDUCTOR_CONFIG!r}}} on both engines "
            "they matched bit for bit (pdqkit's check, 2026-11-29); --enforce-eager needs neither")


def coverage(*, weight_type: str, act_dtype: torch.dtype, group_size: int, n: int, k: int,
             zero_points: bool, has_g_idx: bool, out_dtype: torch.dtype | None = None) -> tuple[bool, str | None]:
    """Whether pdqkit's W4A16 kernels (both of them) cover a linear layer: ``(True, None)`` or ``(False, why)``.

    Covered: int4 symmetric weights stored as ``uint4b8`` (code + 8), group size 128 or channelwise (-1),
    bf16/fp16 activations (output in the same dtype), ``N % 64 == 0`` and ``K % 128 == 0`` for this rank's
    partition (N = output features, K = input features), no activation reordering (g_idx), no zero points.
    ``weight_type`` is vLLM's ScalarType as a string (``str(scalar_types.uint4b8) == "uint4b8"``).
    """
    if str(weight_type) != "uint4b8":
        return False, f"weight type {weight_type} is not uint4b8 (symmetric int4)"
    if zero_points:
        return False, "zero points (asymmetric int4) are not supported"
    if has_g_idx:
        return False, "activation reordering (g_idx / act-order) is not supported"
    if act_dtype not in SUPPORTED_ACT_DTYPES:
        return False, f"activation dtype {act_dtype} is not bfloat16/float16"
    if out_dtype is not None and out_dtype != act_dtype:
        return False, f"output dtype {out_dtype} differs from the activation dtype {act_dtype}"
    if group_size not in SUPPORTED_GROUP_SIZES:
        return False, f"group size {group_size} is not 128 or channelwise (-1)"
    if n % N_MULTIPLE:
        return False, f"N={n} output features are not a multiple of {N_MULTIPLE}"
    if k % K_MULTIPLE:
        return False, f"K={k} input features are not a multiple of {K_MULTIPLE}"
    return True, None


def platform_refusal(is_cuda: bool, capability: tuple[int, int] | None) -> str | None:
    """Why the chosen kernel cannot serve on this platform at all (None when it can). vLLM drops a kernel whose
    ``get_min_capability`` the GPU does not reach before it ever asks ``can_implement``, and keeps the reason
    only when no kernel fits: without this check a T4 or a ROCm GPU would run every layer on vLLM's kernels
    while the log said pdqkit's was registered. ``capability``: (major, minor), None when unknown."""
    if not is_cuda:
        return "the platform is not CUDA (pdqkit's Triton W4A16 kernels are registered for CUDA only)"
    if capability is not None and capability[0] * 10 + capability[1] < MIN_CAPABILITY:
        return (f"the GPU is sm_{capability[0]}{capability[1]}, below the sm_{MIN_CAPABILITY} the kernels need "
                "(bf16 tensor-core MMA)")
    return None


def _load_op(choice: str):
    """Import the pdqkit module that defines the op of ``choice`` (registers ``torch.ops.pdqkit.*``)."""
    import importlib

    op_name, module = _OPS[choice]
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install must not silently fall back to vLLM's kernels
        raise RuntimeError(f"{ENV_VAR}={choice}: cannot import {module} (defines torch.ops.pdqkit.{op_name}): "
                           f"{type(e).__name__}: {e}; reinstall pdqkit or unset {ENV_VAR}") from e
    return getattr(torch.ops.pdqkit, op_name)


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (vLLM may call it more than once per process).

    Unset ``$PDQKIT_VLLM_KERNEL``: registers nothing. Set: registers the chosen kernel class with vLLM's
    mixed-precision registry for CUDA and puts it first in the candidate list.
    """
    choice = selected_kernel()
    if choice is None:
        logger.debug("pdqkit: %s unset, vLLM's own W4A16 kernels are used", ENV_VAR)
        return
    from vllm.platforms import PlatformEnum, current_platform

    try:
        cc = current_platform.get_device_capability() if current_platform.is_cuda() else None
    except Exception:  # noqa: BLE001  (no device visible in this process: the workers check again)
        cc = None
    why = platform_refusal(current_platform.is_cuda(), None if cc is None else (cc.major, cc.minor))
    if why:
        _vllm_logger().warning("pdqkit: %s=%s is set but %s; vLLM's own W4A16 kernels serve every layer",
                               ENV_VAR, choice, why)
        return
    _load_op(choice)
    from vllm.model_executor.kernels import linear as vllm_linear

    cls = kernel_class(choice)
    # vLLM's public API appends; candidates are tried in list order, so move ours to the front (once).
    cuda_kernels = vllm_linear._POSSIBLE_KERNELS.setdefault(PlatformEnum.CUDA, [])
    if cuda_kernels[:1] == [cls]:
        return
    if cls not in cuda_kernels:
        vllm_linear.register_linear_kernel(cls, PlatformEnum.CUDA, "mp")
    cuda_kernels.remove(cls)
    cuda_kernels.insert(0, cls)
    _vllm_logger().info("pdqkit: %s=%s, %s registered first for W4A16 (mixed-precision) linear layers",
                        ENV_VAR, choice, cls.__name__)


def kernel_class(choice: str):
    """The ``MPLinearKernel`` subclass of ``choice`` (imports vLLM)."""
    return _kernel_classes()[choice]


@functools.cache
def _vllm_logger():
    global logger
    from vllm.logger import init_logger

    logger = init_logger("vllm.pdqkit")
    return logger


@functools.cache
def _kernel_classes() -> dict:
    """Build the two kernel classes; vLLM is imported here, never at module import."""
    from vllm import envs
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearKernel,
        MPLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils.marlin_utils import USE_FP32_REDUCE_DEFAULT
    from vllm.model_executor.parameter import BasevLLMParameter, permute_param_layout_
    from vllm.platforms import current_platform

    log = _vllm_logger()

    class _PdqkitLinearKernel(MPLinearKernel):
        """Shared part: coverage, compile-cache tag, compressed-tensors params as plain parameters."""

        choice: str = ""

        @classmethod
        def get_min_capability(cls) -> int:
            return MIN_CAPABILITY

        @classmethod
        def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
            if not current_platform.is_cuda():
                ok, why = False, "pdqkit's Triton W4A16 kernels run on CUDA only"
            else:
                k, n = c.partition_weight_shape
                # has_g_idx: vLLM 0.26.0's field; later releases dropped act-order and the field with it (0.33.0,
                # read from its wheel on 2026-12-02)
                ok, why = coverage(weight_type=str(c.weight_type), act_dtype=c.act_type, out_dtype=c.out_type,
                                   group_size=c.group_size, n=n, k=k, zero_points=c.zero_points,
                                   has_g_idx=bool(getattr(c, "has_g_idx", False)))
            if not ok:  # vLLM drops the reasons of skipped kernels when a later one fits: say it here
                # a warning for `exact`: the layer then loses bit-identity to Marlin
                say = log.warning_once if cls.choice == "exact" else log.info_once
                say("pdqkit: %s does not cover this layer (%s); vLLM picks its next kernel", cls.__name__, why)
            return ok, why

        def __init__(self, c: MPLinearLayerConfig, *args, **kwargs) -> None:
            super().__init__(c, *args, **kwargs)
            _load_op(self.choice)
            _tag_compile_cache(self.choice)
            log.debug("pdqkit: %s for a [N=%d, K=%d] W4A16 layer", type(self).__name__,
                      c.partition_weight_shape[1], c.partition_weight_shape[0])

        def _plain_ct_params(self, layer: torch.nn.Module) -> None:
            """Check the compressed-tensors layout and replace both params by plain contiguous ones."""
            k, n = self.config.partition_weight_shape
            groups = 1 if self.config.group_size == -1 else k // self.config.group_size

            def w_q(x):
                if isinstance(x, BasevLLMParameter):  # -> [N, K/8], packed along K (dim 1)
                    permute_param_layout_(x, input_dim=1, output_dim=0, packed_dim=1)
                _expect(x, (n, k // 8), torch.int32, self.w_q_name)
                return x.data.contiguous()

            def w_s(x):
                if isinstance(x, BasevLLMParameter):  # -> [N, K/G]
                    permute_param_layout_(x, input_dim=1, output_dim=0)
                _expect(x, (n, groups), self.config.act_type, self.w_s_name)
                return x.data.contiguous()

            self._transform_param(layer, self.w_q_name, w_q)
            self._transform_param(layer, self.w_s_name, w_s)

        def _weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            # (w_q, w_s, w_zp, w_gidx) from vLLM 0.26.0, (w_q, w_s, w_zp) from releases without act-order (0.33.0)
            w_q, w_s = self._get_weight_params(layer)[:2]
            return w_q, w_s

        def _out_shape(self, x: torch.Tensor) -> tuple:
            return x.shape[:-1] + (self.config.partition_weight_shape[1],)

    class PdqkitExactLinearKernel(_PdqkitLinearKernel):
        """Marlin-order W4A16: the same bits as vLLM 0.26.0's ``MarlinLinearKernel``.

        ``apply_weights`` mirrors ``MarlinLinearKernel.apply_weights`` -> ``apply_gptq_marlin_linear``:
        ``x.reshape(-1, K)``, one GEMM over all rows with ``use_fp32_reduce=USE_FP32_REDUCE_DEFAULT`` (True),
        the SM count of the weight's device (what Marlin reads: ``cudaDevAttrMultiProcessorCount``),
        the bias added INSIDE the GEMM epilogue (``RN(RN(acc) + b)``, Marlin's order; the bias stays in its
        natural order: Marlin's permutation of it is internal to Marlin), then reshape to ``[..., N]``.
        Not mirrored: ``VLLM_MARLIN_USE_ATOMIC_ADD=1`` (atomic, non-deterministic reduction; a warning is
        logged). ``VLLM_MARLIN_INPUT_DTYPE`` (int8/fp8 activations) makes vLLM ask for an activation type
        :func:`coverage` refuses, so with it every layer runs on vLLM's Marlin (W4A8), as the log says.
        """

        choice = "exact"

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            self._plain_ct_params(layer)
            self.use_fp32_reduce = bool(USE_FP32_REDUCE_DEFAULT)
            w_q = getattr(layer, self.w_q_name)
            # Marlin's own choice: cudaDevAttrMultiProcessorCount of the weight's device (the slice's under MIG)
            self.sms = torch.cuda.get_device_properties(w_q.device).multi_processor_count if w_q.is_cuda else -1
            if w_q.is_cuda:   # the fused fold's counters: allocated outside any CUDA-graph capture, and zeroed
                reserve(w_q.device, zero=True)   # on every load (sleep mode level 2 discards their memory)
            # VLLM_MARLIN_INPUT_DTYPE never reaches here: vLLM then asks for int8/fp8 activations, which coverage()
            # refuses (logged), and Marlin serves those layers
            if envs.VLLM_MARLIN_USE_ATOMIC_ADD:
                log.warning_once("pdqkit: VLLM_MARLIN_USE_ATOMIC_ADD is set; Marlin would then reduce with "
                                 "atomics, the exact kernel does not follow it (bit-identity to Marlin is lost)")
            try:  # a hint only: whatever vLLM's config looks like, loading goes on
                cc = get_current_vllm_config_or_none().compilation_config
                hint = inductor_hint(cc.mode, cc.backend, cc.inductor_compile_config)
                if hint:
                    log.info_once(hint)
            except Exception:  # noqa: BLE001
                pass

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            w_q, w_s = self._weights(layer)
            x_2d = x.reshape(-1, x.shape[-1])
            out = torch.ops.pdqkit.w4a16_gemm_exact(x_2d, w_q, w_s, bias, self.use_fp32_reduce, self.sms)
            return out.reshape(self._out_shape(x))

    class PdqkitFastLinearKernel(_PdqkitLinearKernel):
        """pdqkit's fast Triton W4A16 GEMM (not bit-identical to Marlin; same dequantized weights).

        The op reads the compressed-tensors layout directly (no repack) and adds the bias in fp32 before its
        single rounding. Its split-K and Gluon prefill kernels keep per-device tile-counter buffers that must exist
        before CUDA-graph capture (vLLM 0.26.0 captures without eager warm-up runs): they are allocated at load
        time (:func:`kernels.counters.reserve`), and one M=1 call on the first layer of each device compiles the
        batch-1 kernel.
        """

        choice = "fast"
        _warmed: set = set()

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            self._plain_ct_params(layer)
            w_q, w_s = self._weights(layer)
            if w_q.is_cuda:
                reserve(w_q.device, zero=True)   # on every load, not only the first: sleep mode level 2 discards them
                if w_q.device not in self._warmed:
                    x = torch.zeros(1, self.config.partition_weight_shape[0], dtype=w_s.dtype, device=w_q.device)
                    torch.ops.pdqkit.w4a16_gemm(x, w_q, w_s, None)
                    self._warmed.add(w_q.device)

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            w_q, w_s = self._weights(layer)
            x_2d = x.reshape(-1, x.shape[-1])
            out = torch.ops.pdqkit.w4a16_gemm(x_2d, w_q, w_s, bias)
            return out.reshape(self._out_shape(x))

    def _tag_compile_cache(choice: str) -> None:
        # Model layers are built under set_current_vllm_config(); the compile cache hash is computed later
        # (first forward) from the same object, additional_config included.
        cfg = get_current_vllm_config_or_none()
        if cfg is None:
            return
        extra = cfg.additional_config
        if isinstance(extra, dict):
            extra[COMPILE_CACHE_KEY] = choice
        else:
            log.warning_once("pdqkit: additional_config is not a dict, the torch.compile cache cannot tell "
                             "pdqkit's kernel apart; set VLLM_DISABLE_COMPILE_CACHE=1 when switching kernels")

    def _expect(x: torch.Tensor, shape: tuple, dtype: torch.dtype, name: str) -> None:
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            raise ValueError(f"pdqkit: {name} is {x.dtype} {tuple(x.shape)}, expected {dtype} {tuple(shape)} "
                             f"(compressed-tensors pack-quantized layout); unset {ENV_VAR} for this checkpoint")

    for cls in (PdqkitExactLinearKernel, PdqkitFastLinearKernel):
        cls.__module__ = __name__
    return {"exact": PdqkitExactLinearKernel, "fast": PdqkitFastLinearKernel}
