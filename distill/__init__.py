"""pdqkit distill: recover a pruned student from its unpruned teacher (``python -m distill``).

Phase 1: forward KL on softcapped logits + normalised hidden-state MSE, layer to layer. Phase 2: on-policy GKD
(generalized JSD, TRL's convention). One process or ``torchrun`` with FSDP2; checkpoint / resume bit-exact.

Modules: :mod:`~distill.config` (``DistillConfig``), :mod:`~distill.losses` (chunked logit losses, hidden
MSE), :mod:`~distill.models` (loading, freezing, the student training module), :mod:`~distill.sample`
(on-policy sampling), :mod:`~distill.data` (token windows, rank sharding), :mod:`~distill.parallel`
(process group, FSDP2), :mod:`~distill.state` (training checkpoints), :mod:`~distill.train` (the loop, the
bf16 output + lineage), :mod:`~distill.toy` (toy pairs for tests and benchmarks).
"""
