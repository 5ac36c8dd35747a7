"""pdqkit prune: calibrated structural pruning of the language stack's MLP intermediate width.

``python -m prune CKPT -o OUT --ratio 0.2 --criterion activation`` keeps, in every decoder layer, the
top ``width * (1 - ratio)`` (rounded to a multiple of 128) channels of ``gate_proj``/``up_proj`` rows and
``down_proj`` columns by importance, and writes a bf16 checkpoint with the new ``intermediate_size`` and a
``prune`` lineage step. With ``--refit`` the kept ``down_proj`` columns are then refit by damped least squares
to reproduce the unpruned layer's ``down_proj`` output on the calibration tokens (:mod:`.refit`).
Modules: :mod:`.config` (settings, rounding), :mod:`.calib` (calibration windows), :mod:`.stack`
(layer-by-layer statistics and Gram matrices), :mod:`.importance` (criteria), :mod:`.refit`, :mod:`.slicing`,
:mod:`.run`.
"""
