"""Session fixtures of the evaluation bed (bench/), shared by every test module that needs a trained model.

Enable suite-wide with one line in tests/conftest.py: ``pytest_plugins = ["tests.bench_fixtures"]``
(a module can also ``from tests.bench_fixtures import trained_micro``).
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_micro():
    """Path of a trained ``micro`` Gemma-4 checkpoint (bf16, bench tokenizer, ``base`` lineage).

    Trained once per machine on the bench corpus (``bench.train.TEST_MICRO``: 40 steps, ~10-20 s on 2 CPU
    cores) and kept in the bench cache (``$PDQKIT_CACHE``, default ``~/.cache/pdqkit``) under a key of its
    config and sources; deterministic on a given machine. Read-only: write derived checkpoints elsewhere."""
    from bench.train import trained_micro_checkpoint

    return trained_micro_checkpoint()
