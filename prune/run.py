"""One prune run: checkpoint in, calibrate, score, slice, checkpoint out (:func:`prune_checkpoint`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pack.checkpoint import lineage_step, save_bf16_checkpoint, sha256_file

from .calib import CalibrationSet, default_calib_path, load_calibration
from .config import ROUND_MULTIPLE, PruneConfig, kept_width
from .importance import channel_scores, select_channels
from .slicing import set_intermediate_size, slice_mlp
from .stack import check_supported, collect_mlp_stats, language_stack

__all__ = ["PruneResult", "prune_checkpoint", "load_model"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass
class PruneResult:
    out: Path
    config: PruneConfig
    layers: int
    width_before: int
    width_after: int
    double_wide_layers: int
    calibration: CalibrationSet | None
    seconds: float

    def summary(self) -> str:
        c = self.config
        target = self.width_before * (1 - c.ratio)
        if c.ratio == 0:
            rounding = "ratio 0: every channel kept, no rounding"
        else:
            rounding = f"target {target:.1f} rounded to a multiple of {ROUND_MULTIPLE}: {self.width_after}"
        cut = 100.0 * (1 - self.width_after / self.width_before)
        wide = (f", {self.double_wide_layers} double-wide layers {2 * self.width_before} -> {2 * self.width_after}"
                if self.double_wide_layers else "")
        if self.calibration is not None:
            cal = self.calibration
            crit = f"{c.criterion} ({c.aggregation} over tokens)"
            data = f"calibration {cal.samples} x {cal.seq_len} = {cal.tokens} tokens"
        else:
            crit = c.criterion
            data = "calibration none (data-free)"
        return (f"prune: {self.layers} layers, intermediate_size {self.width_before} -> {self.width_after} "
                f"(-{cut:.1f}%; {rounding}{wide}), criterion {crit}, {data}, {c.device}, "
                f"{self.seconds:.1f} s -> {self.out}")


def _read_config(ckpt: Path):
    from transformers import AutoConfig

    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.json; pass an HF checkpoint directory")
    config = AutoConfig.from_pretrained(ckpt)
    check_supported(config, where=str(ckpt))
    return config


def load_model(ckpt, config=None):
    """The checkpoint's own architecture class (``config.architectures[0]``), bf16, on the CPU, eval mode."""
    import transformers

    ckpt = Path(ckpt)
    config = config or _read_config(ckpt)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{ckpt}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not provide")
    return cls.from_pretrained(ckpt, dtype=torch.bfloat16).eval()


def _load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{ckpt}: no usable tokenizer ({type(e).__name__}); the activation/wanda criteria tokenize "
                         f"the calibration text with the checkpoint's tokenizer: add tokenizer files or use "
                         f"--criterion magnitude|random") from None


def _calibration_record(cal: CalibrationSet, cfg: PruneConfig) -> dict:
    if cfg.calib is None:  # the bench corpus: name it by content, not by its machine-local cache path
        from bench.corpus import corpus_sha256

        source = {"dataset": "bench.corpus", "split": "calib", "revision": corpus_sha256()}
    else:
        source = {"dataset": cfg.calib, "split": None, "revision": None}
    return {**source, "config": None, "num_samples": cal.samples, "seq_len": cal.seq_len, "tokens": cal.tokens,
            "documents": cal.documents, "seed": cfg.seed, "sha256": cal.sha256, "file_sha256": cal.file_sha256}


def prune_checkpoint(ckpt, out, cfg: PruneConfig, *, force: bool = False, progress: bool = True) -> PruneResult:
    """Prune checkpoint dir ``ckpt`` per ``cfg`` and write the bf16 result to ``out`` (atomically).

    Every check that can fail (config, architecture, widths, output dir, calibration file, tokenizer, device)
    runs before the model is loaded; on any error nothing is left at ``out``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint directory")
    if out.absolute() == ckpt.absolute():
        raise ValueError(f"{out}: the output directory must differ from the input checkpoint")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output directory exists; pass --force to overwrite it")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    config = _read_config(ckpt)
    width = config.get_text_config().intermediate_size
    kept = kept_width(width, cfg.ratio)

    cal = None
    if cfg.needs_calibration:
        path = Path(cfg.calib) if cfg.calib is not None else default_calib_path()
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path}: no such file; pass --calib FILE")
        cal = load_calibration(path, _load_tokenizer(ckpt), cfg.samples, cfg.seq_len)
    weights = sorted(f for p in WEIGHT_PATTERNS for f in ckpt.glob(p))
    input_sha = {f.name: sha256_file(f) for f in weights}

    model = load_model(ckpt, config)
    layers = language_stack(model).layers
    stats = [None] * len(layers)
    if cal is not None:
        total = -(-cal.samples // cfg.batch_size) * (len(layers) + 1)
        with tqdm(total=total, desc="prune: calibrating", unit="batch", disable=not progress) as bar:
            stats = collect_mlp_stats(model, cal.input_ids, batch_size=cfg.batch_size, device=cfg.device,
                                      progress=bar)
    gen = torch.Generator().manual_seed(cfg.seed)
    double_wide = 0
    for layer, st in zip(layers, stats):
        mlp = layer.mlp
        w = mlp.down_proj.in_features
        if w not in (width, 2 * width):
            raise ValueError(f"{ckpt}: a layer MLP has width {w}, neither intermediate_size {width} nor twice it")
        double_wide += w == 2 * width
        keep_n = kept * (w // width)
        if cfg.ratio == 0:
            keep = torch.arange(w)
        else:
            keep = select_channels(channel_scores(cfg.criterion, mlp, st, cfg.aggregation, gen), keep_n)
        slice_mlp(mlp, keep)
    set_intermediate_size(model, kept)

    params = {"ratio": cfg.ratio, "criterion": cfg.criterion,
              "aggregation": cfg.aggregation if cal is not None else None,
              "intermediate_size": width, "kept_intermediate_size": kept, "round_multiple": ROUND_MULTIPLE,
              "seed": cfg.seed}
    step = lineage_step("prune", method=f"mlp_width/{cfg.criterion}", params=params,
                        input_files_sha256=input_sha,
                        calibration=[_calibration_record(cal, cfg)] if cal is not None else [])
    save_bf16_checkpoint(model, out, source_dir=ckpt, step=step, force=force)
    return PruneResult(out, cfg, len(layers), width, kept, double_wide, cal, time.perf_counter() - t0)
