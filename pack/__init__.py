"""pdqkit pack: W4A16 observer, int4 packer and the compressed-tensors pack-quantized writer."""
