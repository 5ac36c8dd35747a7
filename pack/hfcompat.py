"""The transformers API names pdqkit calls that changed between the releases it runs on (5.16 .. 5.24).

transformers 5.24 renamed two things pdqkit uses; the old names still work there but warn (``FutureWarning``) and are
announced for removal (``past_key_values`` in 5.40, ``gradient_checkpointing_*`` in v6). Each helper takes the new
name where the installed transformers has it, else the old one, so the same code runs on 5.17 (the GPU image, CI)
and on newer releases without warnings.
"""
from __future__ import annotations

import functools
import inspect

__all__ = ["cache_kwarg", "checkpointing_enable", "checkpointing_disable", "checkpointing_on"]


@functools.lru_cache(maxsize=None)
def _params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def cache_kwarg(fn) -> str:
    """The name under which ``fn`` (a model's ``forward``, ``create_causal_mask``, ...) takes the KV cache:
    ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in _params(fn) else "past_key_values"


def checkpointing_enable(model, checkpoint_kwargs: dict | None = None) -> None:
    """Activation checkpointing on every decoder layer of ``model``; ``checkpoint_kwargs`` go to
    ``torch.utils.checkpoint.checkpoint`` (``activation_checkpointing_enable`` in transformers >= 5.24, else
    ``gradient_checkpointing_enable``). Both set each layer's ``gradient_checkpointing`` flag."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def checkpointing_disable(model) -> None:
    """Activation checkpointing off (the counterpart of :func:`checkpointing_enable`)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointing_on(model) -> bool:
    """Whether activation checkpointing is on for ``model``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)
