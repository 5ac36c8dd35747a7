"""pdqkit kernels."""
