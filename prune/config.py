"""Settings of a prune run (:class:`PruneConfig`) and the width rounding rule (:func:`kept_width`)."""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

__all__ = ["CRITERIA", "AGGREGATIONS", "ROUND_MULTIPLE", "PruneConfig", "kept_width"]

# activation / wanda read calibration statistics, taylor a forward + backward pass on the calibration windows
# (prune/taylor.py); magnitude / random are data-free baselines
CRITERIA = ("activation", "wanda", "taylor", "magnitude", "random")
DATA_CRITERIA = ("activation", "wanda", "taylor")
# how a channel's activations are reduced over the calibration tokens: l2 = sqrt(sum a^2), mean = mean |a|
AGGREGATIONS = ("l2", "mean")
# the kept width is a multiple of 128: the int4 group size and Marlin's K tile (down_proj's K is this width)
ROUND_MULTIPLE = 128


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``ratio`` in [0, 1): the fraction of MLP channels removed; 0 keeps every channel
    (the identity run: the checkpoint goes through the same slicing and writer, no calibration).

    ``refit``: after slicing, replace each layer's kept ``down_proj`` columns by the least-squares optimum for
    reproducing the unpruned ``down_proj`` output on the calibration tokens (:mod:`prune.refit`); this needs
    calibration data whatever the criterion. ``refit_damp``: its ridge damping, relative to the mean diagonal
    of the kept channels' Gram matrix (finite, > 0)."""

    ratio: float = 0.2
    criterion: str = "activation"
    aggregation: str = "l2"
    calib: str | None = None  # None: the evaluation bed's calib split; "bench:train": its train split; else a file
    samples: int = 1024
    seq_len: int = 512
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    refit: bool = False
    refit_damp: float = 0.01

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0) or math.isnan(self.ratio):
            raise ValueError(f"--ratio {self.ratio}: must be in [0, 1) (the fraction of MLP channels removed; "
                             f"0 keeps all)")
        if self.criterion not in CRITERIA:
            raise ValueError(f"--criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--agg {self.aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        if self.criterion == "taylor" and self.seq_len < 2:
            raise ValueError(f"--seq-len {self.seq_len}: taylor needs windows of at least 2 tokens (a window's loss "
                             "is its next-token prediction; one token has none)")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"--seed {self.seed}: must be in [0, 2^63)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device!r}: use cpu, cuda or cuda:N")
        if self.calib is not None:
            from .calib import bench_split

            bench_split(self.calib)  # a bench:SPLIT must be bench:calib / bench:train: raises for bench:valid
        d = self.refit_damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"--refit-damp {d}: must be a finite number > 0 (ridge damping relative to the mean "
                             f"diagonal of the kept channels' Gram matrix; default 0.01)")

    @property
    def scores_from_data(self) -> bool:
        """The channel scores come from calibration statistics (a data criterion that actually prunes; at
        ratio 0 every channel is kept and nothing is scored)."""
        return self.ratio > 0 and self.criterion in DATA_CRITERIA

    @property
    def needs_calibration(self) -> bool:
        return self.scores_from_data or (self.ratio > 0 and self.refit)


def kept_width(width: int, ratio: float, multiple: int = ROUND_MULTIPLE) -> int:
    """The MLP width kept when pruning ``ratio`` of ``width`` channels: ``width * (1 - ratio)`` rounded to the
    nearest multiple of ``multiple`` (halves round up, i.e. keep more). ``ratio == 0`` keeps ``width`` as is.

    Raises ``ValueError`` when the result is not a real prune: ``width`` below ``multiple``, a kept width of 0,
    or one that rounds back to ``width``.
    """
    if ratio == 0:
        return width
    if width < multiple:
        raise ValueError(f"intermediate_size {width} is below the rounding multiple {multiple}: "
                         f"cannot prune to a multiple of {multiple}")
    # exact arithmetic: in floats 2560 * (1 - 0.675) is just below 6.5 multiples of 128 and a half would round down
    exact = Fraction(width) * (1 - Fraction(str(ratio)))
    target = float(exact)
    kept = multiple * math.floor(exact / multiple + Fraction(1, 2))
    if kept <= 0:
        raise ValueError(f"--ratio {ratio} of intermediate_size {width} leaves {target:.1f} channels, which rounds "
                         f"to 0 at a multiple of {multiple}; use a smaller ratio")
    if kept >= width:
        raise ValueError(f"--ratio {ratio} of intermediate_size {width} leaves {target:.1f} channels, which rounds "
                         f"back to {kept} at a multiple of {multiple} (nothing pruned); use a larger ratio")
    return kept
