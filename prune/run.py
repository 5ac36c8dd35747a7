"""One prune run: checkpoint in, calibrate, score, slice (optionally refit down_proj), checkpoint out
(:func:`prune_checkpoint`)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pack.checkpoint import (FileHasher, check_output_dir, check_replaceable, check_writable_parent, lineage_step,
                             parallel_hash_workers, read_lineage, save_bf16_checkpoint)
from pack.hfload import check_weight_dtypes, from_pretrained_checked, read_config, weight_files

from .calib import CalibrationSet, bench_split, default_calib_path, load_calibration
from .config import ROUND_MULTIPLE, PruneConfig, kept_width
from .importance import channel_scores, select_channels
from .refit import refit_down_proj
from .slicing import set_intermediate_size, slice_mlp
from .stack import check_supported, collect_mlp_stats, language_stack
from .taylor import taylor_stats

__all__ = ["PruneResult", "prune_checkpoint", "load_model"]

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
    # per layer (layer order) with --refit: squared reconstruction error of down_proj's output on the
    # calibration tokens, plain slicing vs refit (prune.refit.RefitResult); empty without refit
    refit_errors: list[tuple[float, float]] = field(default_factory=list)

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
        over = "windows" if c.criterion == "taylor" else "tokens"
        crit = f"{c.criterion} ({c.aggregation} over {over})" if c.scores_from_data else c.criterion
        if self.calibration is not None:
            cal = self.calibration
            data = f"calibration {cal.samples} x {cal.seq_len} = {cal.tokens} tokens"
        else:
            data = "calibration none (data-free)"
        refit = ""
        if self.refit_errors:
            before = sum(e0 for e0, _ in self.refit_errors)
            after = sum(e1 for _, e1 in self.refit_errors)
            per = [1 - e1 / e0 for e0, e1 in self.refit_errors if e0 > 0]
            # in-sample: measured on the tokens the least squares were fitted to (with few tokens per kept
            # channel the fit can look good here and be worse on other text: see refit_warning)
            total = 100 * (1 - after / before) if before else 0.0
            refit = (f", refit: least-squares down_proj on {self.calibration.tokens} tokens (damp {c.refit_damp:g}; "
                     f"down_proj reconstruction error on those tokens -{total:.1f}% summed over layers, "
                     f"-{100 * min(per, default=0):.1f}% .. -{100 * max(per, default=0):.1f}% per layer)")
        elif c.refit:
            refit = ", refit: none (ratio 0, nothing removed)"
        return (f"prune: {self.layers} layers, intermediate_size {self.width_before} -> {self.width_after} "
                f"(-{cut:.1f}%; {rounding}{wide}), criterion {crit}, {data}{refit}, {c.device}, "
                f"{self.seconds:.1f} s -> {self.out}")


REFIT_MIN_TOKENS_PER_CHANNEL = 4


def refit_warning(tokens: int, kept_width: int) -> str | None:
    """A one-line warning when ``--refit`` fits each ``down_proj`` (``kept_width`` input columns) on fewer than
    :data:`REFIT_MIN_TOKENS_PER_CHANNEL` calibration tokens per column: the least squares then fit those tokens
    (the summary's in-sample error drops) but can be worse on other text (a review measured a tiny model's
    held-out error up by 4-72 % per layer at 2,048 tokens for 512 columns, and lower at 16k). None otherwise."""
    if tokens >= REFIT_MIN_TOKENS_PER_CHANNEL * kept_width:
        return None
    return (f"prune: warning: --refit fits each down_proj's {kept_width} kept columns on only {tokens} calibration "
            f"tokens (< {REFIT_MIN_TOKENS_PER_CHANNEL} per column): the error reduction in the summary is in-sample "
            f"and may not hold on other text; give more --samples (>= {REFIT_MIN_TOKENS_PER_CHANNEL * kept_width} "
            f"tokens) or drop --refit")


def _read_config(ckpt: Path):
    config = read_config(ckpt, "prune the bf16 checkpoint, then run pack.quantize on the pruned one")
    check_supported(config, where=str(ckpt))
    return config


def load_model(ckpt, config=None):
    """The checkpoint's own architecture class (``config.architectures[0]``), bf16, on the CPU, eval mode; every
    mismatch between the files and config.json refused in one line (:func:`pack.hfload.from_pretrained_checked`)."""
    import transformers

    ckpt = Path(ckpt)
    config = config or _read_config(ckpt)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{ckpt}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not provide")
    return from_pretrained_checked(cls, ckpt, arch, dtype=torch.bfloat16).eval()


def _check_weight_dtypes(ckpt: Path, weights: list[Path]) -> None:
    """:func:`pack.hfload.check_weight_dtypes`, prune's words."""
    check_weight_dtypes(ckpt, weights, "prune", "prune takes the bf16 checkpoint: dequantize or convert it first")


def _load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{ckpt}: no usable tokenizer ({type(e).__name__}); the activation/wanda/taylor criteria "
                         f"tokenize the calibration text with the checkpoint's tokenizer, and so does --refit: add "
                         f"tokenizer files, or use --criterion magnitude|random without --refit") from None


def _calibration_record(cal: CalibrationSet, cfg: PruneConfig) -> dict:
    split = bench_split(cfg.calib)
    if split:  # the bench corpus: name it by content, not by its machine-local cache path
        from bench.corpus import corpus_sha256

        source = {"dataset": "bench.corpus", "split": split, "revision": corpus_sha256()}
    else:
        # its absolute path (as typed it would differ from one working directory to the next, and name nothing
        # outside it)
        source = {"dataset": str(Path(cfg.calib).resolve()), "split": None, "revision": None}
    return {**source, "config": None, "num_samples": cal.samples, "seq_len": cal.seq_len, "tokens": cal.tokens,
            "documents": cal.documents, "seed": cfg.seed, "sha256": cal.sha256, "file_sha256": cal.file_sha256,
            # the windows are not sampled: the first num_samples of the packed stream (the seed is --criterion
            # random's, recorded because the lineage format asks for one)
            "selection": "first",
            # where the statistics (and refit's Gram matrices) were computed: another device's kernels round the
            # calibration forward differently, which can move a channel across the selection's cut (prune/README.md)
            "device": torch.device(cfg.device).type}


def prune_checkpoint(ckpt, out, cfg: PruneConfig, *, force: bool = False, progress: bool = True) -> PruneResult:
    """Prune checkpoint dir ``ckpt`` per ``cfg`` and write the bf16 result to ``out`` (atomically).

    Every check that can fail (config, architecture, widths, output dir, calibration file, tokenizer, device)
    runs before the model is loaded; on any error nothing is left at ``out``.

    Layers are scored, (with ``cfg.refit``) refit and sliced one at a time as calibration passes them, so with
    refit only one layer's float64 Gram matrix (``8 I^2`` bytes on ``cfg.device``) is alive at a time. Every
    layer's statistics and Gram come from the unpruned model (the calibration cache is computed before the
    layer is sliced)."""
    t0 = time.perf_counter()
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint directory")
    check_output_dir(out, {"input checkpoint": ckpt})
    if os.path.lexists(out) and not force:   # a dangling symlink is in the way too
        raise FileExistsError(f"{out}: output directory exists; pass --force to overwrite it")
    if force:
        check_replaceable(out)   # (the writer checks again at the end; this is before the work)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    if cfg.device.startswith("cuda:"):
        index = cfg.device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    config = _read_config(ckpt)
    read_lineage(ckpt)   # a broken lineage file stops the run now, not when the output is written
    check_writable_parent(out, "-o")
    width = config.get_text_config().intermediate_size
    kept = kept_width(width, cfg.ratio)

    cal = None
    if cfg.needs_calibration:
        split = bench_split(cfg.calib)
        path = default_calib_path(split) if split else Path(cfg.calib)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path}: no such file; pass --calib FILE")
        cal = load_calibration(path, _load_tokenizer(ckpt), cfg.samples, cfg.seq_len)
        vocab = config.get_text_config().vocab_size
        top = int(cal.input_ids.max()) if cal.input_ids.numel() else 0
        if top >= vocab:
            raise ValueError(f"{ckpt}: its tokenizer gives token id {top} on the calibration text, outside the "
                             f"model's vocabulary (vocab_size {vocab}): tokenizer and model do not belong together")
    weights = weight_files(ckpt)   # what from_pretrained reads: the files the lineage hashes
    _check_weight_dtypes(ckpt, weights)
    # the input's sha256 for the lineage, hashed while the model loads and calibrates (children, one per file up to
    # the cores; through pack's input-hash cache): of the files as opened now, the version the model is loaded from
    hasher = FileHasher(weights, workers=parallel_hash_workers(len(weights)))
    try:
        return _prune_loaded(ckpt, out, cfg, config, cal, width, kept, hasher, force, progress, t0)
    finally:
        hasher.close()


def _prune_loaded(ckpt: Path, out: Path, cfg: PruneConfig, config, cal, width: int, kept: int, hasher,
                  force: bool, progress: bool, t0: float) -> PruneResult:
    """:func:`prune_checkpoint` from loading the model on (``hasher``: the input files' :class:`FileHasher`)."""
    from tqdm.auto import tqdm

    model = load_model(ckpt, config)
    layers = language_stack(model).layers
    double_wide = 0
    for i, layer in enumerate(layers):
        w = layer.mlp.down_proj.in_features
        if w not in (width, 2 * width):
            raise ValueError(f"{ckpt}: layer {i} MLP has width {w}, neither intermediate_size {width} nor twice it")
        double_wide += w == 2 * width
    if cfg.refit and cfg.ratio > 0 and cal is not None:
        warn = refit_warning(cal.tokens, kept * (2 if double_wide else 1))
        if warn:
            print(warn, file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    refit_errors = []
    taylor = cfg.scores_from_data and cfg.criterion == "taylor"
    # taylor scores come from one forward + backward pass of the whole unpruned model (prune/taylor.py), before
    # any layer is sliced; the layer-by-layer pass below then only feeds --refit its Gram matrices
    batches = -(-cal.samples // cfg.batch_size) if cal is not None else 0
    layer_pass = cal is not None and (cfg.refit or (cfg.scores_from_data and not taylor))
    total = batches * ((len(layers) + 1) * layer_pass + taylor)
    bar = tqdm(total=total, desc="prune: calibrating", unit="batch", disable=not progress or not total)
    scores_stats = None

    def prune_layer(i, st):
        """Select layer ``i``'s channels (scores from ``st``, or the taylor pass), refit its down_proj
        (``st.gram``) and slice it."""
        mlp = layers[i].mlp
        w = mlp.down_proj.in_features
        keep_n = kept * (w // width)  # a double-wide layer keeps twice as many
        if cfg.ratio == 0:
            keep = torch.arange(w)
        else:
            by = scores_stats[i] if taylor else st
            keep = select_channels(channel_scores(cfg.criterion, mlp, by, cfg.aggregation, gen), keep_n)
        down = None
        if cfg.refit and st is not None:
            r = refit_down_proj(mlp.down_proj.weight, st.gram, keep, cfg.refit_damp, where=f"{ckpt}: layer {i}")
            down = r.weight
            refit_errors.append((r.error_before, r.error_after))
        slice_mlp(mlp, keep, down)

    with bar:
        if taylor:
            scores_stats = taylor_stats(model, cal.input_ids, batch_size=cfg.batch_size, device=cfg.device,
                                        progress=bar)
        if layer_pass:
            collect_mlp_stats(model, cal.input_ids, batch_size=cfg.batch_size, device=cfg.device, progress=bar,
                              gram=cfg.refit, on_layer=prune_layer)
        else:
            for i in range(len(layers)):
                prune_layer(i, None)
    set_intermediate_size(model, kept)

    params = {"ratio": cfg.ratio, "criterion": cfg.criterion,
              "aggregation": cfg.aggregation if cfg.scores_from_data else None,
              "intermediate_size": width, "kept_intermediate_size": kept, "round_multiple": ROUND_MULTIPLE,
              "seed": cfg.seed}
    if cfg.refit and cfg.ratio > 0:  # only a refit that ran (a run without one writes what it always did)
        params.update(refit=True, refit_damp=cfg.refit_damp)
    hashes = hasher.result()
    step = lineage_step("prune", method=f"mlp_width/{cfg.criterion}", params=params, input_files_sha256=hashes,
                        calibration=[_calibration_record(cal, cfg)] if cal is not None else [])
    # (an input without a lineage, e.g. a hub snapshot, first gets its base step: the model the chain started from)
    save_bf16_checkpoint(model, out, source_dir=ckpt, step=step, force=force, fsync=True,
                         source_files_sha256=hashes)
    return PruneResult(out, cfg, len(layers), width, kept, double_wide, cal, time.perf_counter() - t0, refit_errors)
