"""Settings of a distill run: :class:`DistillConfig` (validated on construction).

Phase 1 — forward KL (teacher || student) on softcapped logits at ``temperature`` (``T^2``-scaled) plus
normalised hidden-state MSE on ``hidden_layers`` (weights ``hidden_layer_weights``, summed and scaled by
``hidden_weight``). Phase 2 — on-policy GKD: with probability ``lmbda`` a step's continuations
(``max_new_tokens`` after a ``seq_len - max_new_tokens`` token prompt) are sampled from the student at
``sample_temperature``, else taken from the data; the loss is the generalized JSD (``beta``, TRL's convention,
logits at ``jsd_temperature``) over the continuation tokens only. Defaults of phase 2 are TRL's ``GKDConfig``
(lmbda 0.5, beta 0.5, sampling temperature 0.9, 128 new tokens; the JSD itself at temperature 1, as TRL's
``compute_loss`` calls it).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DistillConfig", "check_device", "PHASE_DEFAULTS", "RESULT_FIELDS", "PRECISIONS", "LOSS_IMPLS",
           "TRAINABLE"]

PRECISIONS = ("bf16-mixed", "bf16-master", "fp32")
LOSS_IMPLS = ("autograd", "fused")  # how a logit-loss chunk's gradient is made (losses.chunked_logit_loss)
TRAINABLE = ("all", "mlp")  # what the student trains (DistillConfig.trainable, models.set_trainable)

# Per-phase defaults for the fields left at None. Sized for the bench `small` pair (its teacher sees
# 600 x 64 x 1024 = 39.3M tokens): phase 1 1.64M + phase 2 0.16M tokens = 4.6% of that, well under a minute
# each on an H200. lr: on the CPU micro pair 1e-4 recovered the most (3e-4 and 1e-3 made a barely-hurt
# pruned student worse: Adam moves every weight by ~lr per step whatever the gradient's size).
PHASE_DEFAULTS = {
    1: dict(steps=200, batch=16, seq_len=512, lr=1e-4, hidden_weight=1.0),
    2: dict(steps=40, batch=16, seq_len=256, lr=5e-5, hidden_weight=0.0),
}
# Fields that change the trained weights: a --resume must match them exactly (the others — output paths,
# logging, checkpoint cadence — may differ between the killed run and its continuation).
RESULT_FIELDS = (
    "teacher", "student", "phase", "data", "steps", "batch", "seq_len", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "adam_betas", "adam_eps", "grad_clip", "seed", "temperature", "hidden_weight", "hidden_layers",
    "hidden_layer_weights", "lmbda", "beta", "sample_temperature", "jsd_temperature", "max_new_tokens",
    "train_embeddings", "precision", "chunk", "max_tokens", "attn", "trainable", "ema_decay", "ce_weight",
    "loss_impl", "compile_loss", "compile_layers", "deterministic",   # same math, other rounding: other bytes
)


def check_device(device: str) -> None:
    """ValueError unless ``device`` is what ``--device`` takes: auto, cpu, cuda or cuda:N."""
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


@dataclass
class DistillConfig:
    teacher: str = ""
    student: str = ""
    out: str = ""
    phase: int = 1
    data: str | None = None  # None: the evaluation bed's train split (bench.corpus.split_path("train"))
    max_tokens: int | None = None  # use only the first N data tokens (None: all; windows are sampled over them)
    # optimisation (None: PHASE_DEFAULTS[phase])
    steps: int | None = None
    batch: int | None = None  # global batch (sequences per step, over all ranks)
    seq_len: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int | None = None  # None: 10% of steps
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8  # torch's AdamW default; larger values damp the steps of weights with tiny gradients
    grad_clip: float = 1.0
    # 0: off. Else the weights written at the end are an exponential moving average of the optimizer's weights,
    # ema <- d * ema + (1 - d) * w after every step, started from the student's own weights (distill/train.py)
    ema_decay: float = 0.0
    seed: int = 0
    # phase 1 losses
    temperature: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the data's next tokens (temperature 1), added to the KL; 0: off
    hidden_weight: float | None = None
    hidden_layers: list[int] | None = None  # None: every decoder layer
    hidden_layer_weights: list[float] | None = None  # None: uniform 1/len(hidden_layers)
    # phase 2 (GKD; TRL GKDConfig defaults)
    lmbda: float = 0.5
    beta: float = 0.5
    sample_temperature: float = 0.9
    jsd_temperature: float = 1.0
    max_new_tokens: int = 128
    # what is trained, how it runs
    train_embeddings: bool = False
    # "all": every language-stack weight but the embedding tables; "mlp": only the decoder layers' MLP weights
    # (what pruning changed) — attention, norms and scalars stay the teacher's
    trainable: str = "all"
    # "bf16-mixed" (cuda default): fp32 student under torch.autocast; "fp32" (cpu default); "bf16-master"
    # (single process only): bf16 student run like the teacher, AdamW on fp32 master copies (distill/train.py)
    precision: str | None = None
    chunk: int = 2048  # tokens per chunk of the logit loss
    grad_ckpt: bool = False  # activation checkpointing of the student's decoder layers
    ckpt_layers: int | None = None  # with grad_ckpt: checkpoint only the first N decoder layers (None: all)
    attn: str = "sdpa"  # or "pdq_hybrid" (distill/attention.py: flex sliding window + sdpa elsewhere)
    loss_impl: str = "autograd"  # logit-loss chunk gradient: autograd, or fused (forward KL, phase 1 only)
    compile_loss: bool = False  # torch.compile the logit loss's chunk math and the hidden-state term (+ its grad)
    compile_layers: bool = False  # torch.compile every decoder layer's forward (teacher and student; phase 1)
    device: str = "auto"  # auto, cpu, cuda, cuda:N (under torchrun: cuda -> cuda:LOCAL_RANK)
    # deterministic kernels (train.deterministic_kernels): a CUDA run, and a kill -9 + --resume of it, gives
    # the same bytes every time; without it CUDA runs differ in rounding (atomics in attention and cuBLAS)
    deterministic: bool = False
    threads: int | None = None
    # checkpoints and logs
    ckpt_every: int = 0
    ckpt_dir: str | None = None  # None: OUT + "-ckpt"
    resume: bool = False
    keep_ckpt: bool = False
    log_every: int = 10
    log_json: str | None = None
    peak_tflops: float = 989.4  # per-GPU dense bf16 peak for MFU (H100/H200 SXM)
    force: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable {self.trainable!r}: choose one of {TRAINABLE}")
        if self.trainable == "mlp" and self.train_embeddings:
            raise ValueError("--trainable mlp trains only the MLP weights: drop --train-embeddings (or use "
                             "--trainable all)")
        if self.phase not in (1, 2):
            raise ValueError(f"--phase {self.phase}: must be 1 (KL + hidden matching) or 2 (on-policy GKD)")
        for k, v in PHASE_DEFAULTS[self.phase].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 10) if self.steps > 1 else 0
        if not self.teacher or not self.student or not self.out:
            raise ValueError("--teacher, --student and -o/--out are required")
        for name in ("steps", "batch", "seq_len", "max_new_tokens", "chunk", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
        for name in ("ckpt_every", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a non-negative integer")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"--max-tokens {self.max_tokens}: must be at least --seq-len {self.seq_len}")
        for name in ("lr", "temperature", "sample_temperature", "jsd_temperature", "peak_tflops"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a positive number")
        for name in ("weight_decay", "grad_clip", "hidden_weight", "ce_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a non-negative number (grad-clip 0: off)")
        for name in ("lmbda", "beta", "min_lr_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be in [0, 1]")
        if (isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float))
                or not 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"--ema-decay {self.ema_decay}: must be in [0, 1) (0: off; e.g. 0.95 averages over "
                             "about the last 20 steps)")
        betas = self.adam_betas if isinstance(self.adam_betas, str) else ",".join(map(str, self.adam_betas))
        if isinstance(self.adam_betas, str) or len(self.adam_betas) != 2:
            raise ValueError(f"--adam-betas {betas}: give two values, B1,B2")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        b1, b2 = self.adam_betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"--adam-betas {betas}: each must be in [0, 1)")
        if (isinstance(self.adam_eps, bool) or not isinstance(self.adam_eps, (int, float))
                or not math.isfinite(self.adam_eps) or self.adam_eps <= 0):
            raise ValueError(f"--adam-eps {self.adam_eps}: must be a positive number")
        if self.phase == 2 and self.seq_len <= self.max_new_tokens:
            raise ValueError(f"--seq-len {self.seq_len}: phase 2 needs seq_len > --max-new-tokens "
                             f"{self.max_new_tokens} (the prompt is the first seq_len - max_new_tokens tokens)")
        if self.hidden_layers is not None:
            if not self.hidden_layers or any(not isinstance(i, int) or i < 0 for i in self.hidden_layers):
                raise ValueError(f"--hidden-layers {self.hidden_layers}: a non-empty list of layer indices >= 0")
            if len(set(self.hidden_layers)) != len(self.hidden_layers):
                raise ValueError(f"--hidden-layers {self.hidden_layers}: duplicate layer index")
        if self.hidden_layer_weights is not None:
            if self.hidden_layers is None:
                raise ValueError("--hidden-layer-weights needs --hidden-layers (one weight per listed layer)")
            if len(self.hidden_layer_weights) != len(self.hidden_layers):
                raise ValueError(f"--hidden-layer-weights: {len(self.hidden_layer_weights)} weights for "
                                 f"{len(self.hidden_layers)} layers")
            if any(not (math.isfinite(w) and w >= 0) for w in self.hidden_layer_weights):
                raise ValueError(f"--hidden-layer-weights {self.hidden_layer_weights}: must be >= 0")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose bf16-mixed, bf16-master or fp32")
        if self.attn not in ("sdpa", "eager", "flex_attention", "flash_attention_2", "pdq_hybrid"):
            raise ValueError(f"--attn {self.attn!r}: choose sdpa, pdq_hybrid, eager, flex_attention or "
                             "flash_attention_2")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"--loss-impl {self.loss_impl!r}: choose autograd or fused")
        if self.loss_impl == "fused" and self.phase != 1:
            raise ValueError("--loss-impl fused is the forward-KL gradient (phase 1); phase 2's JSD needs autograd")
        if self.ce_weight and self.phase != 1:
            raise ValueError("--ce-weight is a phase-1 term (phase 2 scores continuations the student may have "
                             "sampled itself: they have no data label); drop it")
        if self.compile_loss and self.phase != 1:
            raise ValueError("--compile-loss is for phase 1 (phase 2 scores a different number of tokens every "
                             "on-policy step: each size would compile again)")
        if self.warmup_steps >= self.steps > 1:
            raise ValueError(f"--warmup-steps {self.warmup_steps}: must be below --steps {self.steps} (the cosine "
                             f"decay follows the warm-up)")
        if self.compile_layers and self.phase != 1:
            raise ValueError("--compile-layers is for phase 1 (phase 2's cached decoding would recompile per length)")
        if self.ckpt_layers is not None and (not isinstance(self.ckpt_layers, int) or self.ckpt_layers < 0):
            raise ValueError(f"--ckpt-layers {self.ckpt_layers}: must be a non-negative integer")
        check_device(self.device)
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise ValueError(f"--threads {self.threads}: must be a positive integer")
        if self.ckpt_dir is None:   # a sibling of OUT as written ("out/", "out/." and "./out" name the same OUT)
            base = os.path.normpath(str(self.out))
            if os.path.basename(base) in (".", ".."):   # "-o ." or "-o ..": name the folder itself
                base = os.path.abspath(base)
            self.ckpt_dir = base + "-ckpt"

    def layer_selection(self, num_layers: int) -> tuple[list[int], list[float]]:
        """(layers matched, final per-layer weights = hidden_weight * normalised layer weights)."""
        layers = list(range(num_layers)) if self.hidden_layers is None else list(self.hidden_layers)
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise ValueError(f"--hidden-layers {bad}: the models have {num_layers} layers (0..{num_layers - 1})")
        if self.hidden_weight == 0:
            return [], []
        w = self.hidden_layer_weights or [1.0] * len(layers)
        s = sum(w)
        if s <= 0:
            raise ValueError("--hidden-layer-weights sum to 0; use --hidden-weight 0 to turn hidden matching off")
        return layers, [self.hidden_weight * x / s for x in w]

    def result_dict(self) -> dict:
        """The fields that determine the trained weights (compared on --resume)."""
        d = dataclasses.asdict(self)
        out = {k: d[k] for k in RESULT_FIELDS}
        out["adam_betas"] = list(out["adam_betas"])
        for k in ("teacher", "student", "data"):
            if out[k] is not None:
                out[k] = str(Path(out[k]).resolve())
        return out
