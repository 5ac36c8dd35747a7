"""pack.hfcompat: the transformers names that changed in 5.24 (``cache``, ``activation_checkpointing_*``), each
helper against stand-ins of both APIs and against the installed transformers; and no deprecation warning about
them from prune's calibration, distill's sampling or its activation checkpointing (which matters where the installed
transformers is >= 5.24: see .ci/run's newest-dependencies stage)."""
from __future__ import annotations

import warnings

import pytest
import torch

from pack.hfcompat import cache_kwarg, checkpointing_disable, checkpointing_enable, checkpointing_on

OLD_NAMES = ("past_key_values", "gradient_checkpointing", "is_gradient_checkpointing")


def test_cache_kwarg_follows_the_signature():
    def new(input_ids=None, cache=None, use_cache=None):
        pass

    def old(input_ids=None, past_key_values=None, use_cache=None):
        pass

    assert (cache_kwarg(new), cache_kwarg(old)) == ("cache", "past_key_values")


class _Old:
    """transformers <= 5.17's checkpointing API (what the helpers must call there)."""

    def __init__(self):
        self.calls, self.on = [], False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("gradient_checkpointing_enable", gradient_checkpointing_kwargs))
        self.on = True

    def gradient_checkpointing_disable(self):
        self.calls.append(("gradient_checkpointing_disable", None))
        self.on = False

    @property
    def is_gradient_checkpointing(self):
        return self.on


class _New(_Old):
    """transformers 5.24's: the new names beside the old ones, which warn."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        raise AssertionError("deprecated name called")

    gradient_checkpointing_disable = gradient_checkpointing_enable

    @property
    def is_gradient_checkpointing(self):
        raise AssertionError("deprecated name called")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        self.calls.append(("activation_checkpointing_enable", activation_checkpointing_kwargs))
        self.on = True

    def activation_checkpointing_disable(self):
        self.calls.append(("activation_checkpointing_disable", None))
        self.on = False

    @property
    def is_activation_checkpointing(self):
        return self.on


@pytest.mark.parametrize("cls,prefix", [(_Old, "gradient"), (_New, "activation")])
def test_checkpointing_helpers_call_the_api_there_is(cls, prefix):
    m = cls()
    assert not checkpointing_on(m)
    checkpointing_enable(m, {"use_reentrant": False})
    assert checkpointing_on(m)
    checkpointing_disable(m)
    assert not checkpointing_on(m)
    assert m.calls == [(f"{prefix}_checkpointing_enable", {"use_reentrant": False}),
                       (f"{prefix}_checkpointing_disable", None)]


def _no_old_name_warnings(record) -> None:
    bad = [str(w.message) for w in record if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and any(f"`{n}" in str(w.message) for n in OLD_NAMES)]
    assert not bad, bad


def test_on_the_installed_transformers():
    """Checkpointing flags every decoder layer and back; a KV-cached decode through ``cache_kwarg`` equals the
    full forward's last position; none of it warns about a deprecated name."""
    from transformers import DynamicCache

    from bench.factory import build_model
    from distill.models import decoder_layers

    model = build_model("micro", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        checkpointing_enable(model, {"use_reentrant": False})
        assert checkpointing_on(model) and all(layer.gradient_checkpointing for layer in decoder_layers(model))
        checkpointing_disable(model)
        assert not checkpointing_on(model) and not any(layer.gradient_checkpointing
                                                       for layer in decoder_layers(model))
        dec = model.get_decoder().eval()
        ids = torch.randint(4, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = dec(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
            cache = DynamicCache(config=model.config)
            kw = cache_kwarg(type(dec).forward)
            dec(input_ids=ids[:, :-1], use_cache=True, **{kw: cache})
            step = dec(input_ids=ids[:, -1:], use_cache=True, **{kw: cache}).last_hidden_state[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]   # the cache was the one used (not a fresh one per call)
    _no_old_name_warnings(record)


def test_prune_calibration_does_not_warn(prune_ckpts, tmp_path):
    from prune.config import PruneConfig
    from prune.run import prune_checkpoint

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prune_checkpoint(prune_ckpts["text"], tmp_path / "o", PruneConfig(samples=2, seq_len=64), progress=False)
    _no_old_name_warnings(record)
