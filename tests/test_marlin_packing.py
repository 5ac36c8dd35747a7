"""Marlin layout helpers in pack/packing.py (spec marlin-arithmetic.md §3), checked against the spec's wording."""
from __future__ import annotations

import pytest
import torch

from pack.packing import marlin_permute_bias, marlin_permute_scales, marlin_scale_perm


def test_perms_are_permutations_of_64_and_32_columns():
    assert sorted(marlin_scale_perm(True)) == list(range(64))
    assert sorted(marlin_scale_perm(False)) == list(range(32))


def test_grouped_scales_new_8i_plus_j_takes_old_i_plus_8j():
    s = torch.arange(3 * 128, dtype=torch.float32).reshape(3, 128)  # [K/G = 3, N = 128]
    out = marlin_permute_scales(s, size_k=384, group_size=128)
    for blk in range(2):
        for i in range(8):
            for j in range(8):
                assert torch.equal(out[:, 64 * blk + 8 * i + j], s[:, 64 * blk + i + 8 * j])


@pytest.mark.parametrize("group_size,size_k", [(-1, 256), (128, 128)])  # channelwise, or one group spanning K
def test_channelwise_scales_and_bias_take_the_single_permutation(group_size, size_k):
    s = torch.arange(64, dtype=torch.float32).reshape(1, 64)
    out = marlin_permute_scales(s, size_k=size_k, group_size=group_size)
    bias = marlin_permute_bias(s[0])
    offs = (0, 1, 8, 9, 16, 17, 24, 25)
    for blk in range(2):
        for i in range(4):
            for t in range(8):
                assert out[0, 32 * blk + 8 * i + t] == s[0, 32 * blk + 2 * i + offs[t]]
                assert bias[32 * blk + 8 * i + t] == s[0, 32 * blk + 2 * i + offs[t]]


def test_layout_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        marlin_permute_scales(torch.zeros(2, 96), size_k=256, group_size=128)
    with pytest.raises(ValueError, match="multiple of 32"):
        marlin_permute_bias(torch.zeros(48))
    with pytest.raises(ValueError, match=r"\[K/G, N\]"):
        marlin_permute_scales(torch.zeros(64), size_k=256, group_size=128)
