"""pdqkit distill."""
