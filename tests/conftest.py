"""Shared pytest set-up: `gpu` tests skip without CUDA, `vllm` tests skip without vLLM; under pytest-xdist (README's
test command: ``-n 2 --dist loadfile --no-loadscope-reorder``) one CPU thread per process and the long files first."""
from __future__ import annotations

import importlib.util
import os

XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    # Two workers on CI's two cores: each worker and every process a test starts (pipelines, torchrun ranks, CLIs)
    # run one OpenMP thread, so the cores are not oversubscribed; set before torch is imported. (A serial run
    # leaves the started processes at torch's default; the suite passes both ways.)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# session fixtures: `trained_micro` (bench evaluation bed); `micro_tok`, `prune_ckpts` (prune tests)
pytest_plugins = ["tests.bench_fixtures", "tests.prune_fixtures"]

# The longest files on CI's 2-core host (pytest --durations, seventeenth session; together ~75 % of the suite's
# time). With ``--dist loadfile --no-loadscope-reorder`` xdist hands out whole files in collection order, so these
# start first and the many short files even out the two workers at the end.
LONG_FILES = ("test_quality_pipeline.py", "test_marlin_exact_interp.py", "test_distill_run.py",
              "test_distill_fsdp.py", "test_bench_multi.py", "test_prune_refit.py", "test_pack_errors.py")


def _long_first(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the file order is kept


def pytest_collection_modifyitems(config, items):
    if XDIST_WORKER:
        _long_first(items)
    has_cuda = torch.cuda.is_available()
    has_vllm = importlib.util.find_spec("vllm") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_vllm = pytest.mark.skip(reason="needs vLLM")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not (has_vllm and has_cuda):
            item.add_marker(skip_vllm)


@pytest.fixture(autouse=True)
def _fresh_plan_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty plan cache and input-hash cache of its own (pack.plancache, pack.hashcache), so
    each first run plans and hashes afresh whatever the machine's ~/.cache/pdqkit holds, and no test writes there;
    the processes a test starts inherit them. Not inside ``tmp_path``, which tests inspect."""
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", str(tmp_path_factory.mktemp("plans")))
    monkeypatch.setenv("PDQKIT_HASH_CACHE", str(tmp_path_factory.mktemp("hashes")))


@pytest.fixture(autouse=True, scope="session")
def _transformers_logs_to_the_session_stderr():
    """transformers' log handler writes to the ``sys.stderr`` of when its logging was first set up. Set up inside a
    test that captures stderr (capsys), that is the test's buffer, closed when the test ends: a later warning then
    prints ``--- Logging error ---`` into another test's captured stderr (seen: test_config_transformers_cannot_build
    run after the stio and hash-cache tests). So it is set up once, before any test."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")
