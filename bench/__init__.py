"""pdqkit bench."""
