"""pdqkit prune."""
