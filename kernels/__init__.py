"""pdqkit kernels.

The package's import name is ``kernels`` (the project's layout), which is also the import name of Hugging Face's
``kernels`` distribution (hub kernels, which transformers uses when it finds them). Both cannot live in one
environment: whichever comes first on ``sys.path`` hides the other, and with pdqkit's first, transformers takes the
other's installed version as its own and fails importing hub-kernel names from this package. pdqkit's own version
(outside the range transformers accepts) keeps transformers from probing it when Hugging Face's is not installed
(``tests/test_kernels_shadow.py``); when it is, importing this package says so.
"""
from __future__ import annotations


def _warn_if_hub_kernels_installed() -> None:
    import importlib.metadata
    import warnings

    try:   # a distribution named "kernels" is Hugging Face's (pdqkit's is "pdqkit")
        hub = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(f"pdqkit: Hugging Face's `kernels` {hub} is installed here, and its import name is pdqkit's "
                  f"`kernels` package too ({__file__}): transformers' hub-kernel support will fail to import from "
                  "pdqkit's; use separate environments, or `pip uninstall kernels` where pdqkit runs", stacklevel=2)


_warn_if_hub_kernels_installed()
