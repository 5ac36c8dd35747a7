"""pack.packing against the spec's test vectors and compressed-tensors' own packer (an independent reference).

compressed-tensors' ``pack_to_int32``/``unpack_from_int32`` are what transformers and llmcompressor use to write
and read pack-quantized checkpoints; pdqkit's packer must give the same int32 words for every int4 code tensor.
"""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

from pack.packing import dequantize, group_size_of, pack_int4, unpack_int4, unpack_uint4


def _codes(rows):
    return torch.tensor(rows, dtype=torch.int8)


# spec pack-quantized.md §2.1 test vectors (verified against compressed-tensors there)
@pytest.mark.parametrize("row, word", [
    ([0, 1, 2, 3, 4, 5, 6, 7], -19088744),        # 0xFEDCBA98
    ([-8, -7, -6, -5, -4, -3, -2, -1], 1985229328),  # 0x76543210
    ([7] * 8, -1),
    ([-8] * 8, 0),
    ([0] * 8, -2004318072),                        # 0x88888888
    ([-8, -7, -6], 528),                           # padded with u = 0
])
def test_spec_vectors(row, word):
    packed = pack_int4(_codes([row]))
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() == word
    assert torch.equal(unpack_int4(packed, len(row)), _codes([row]))


def test_low_nibble_holds_smallest_k():
    codes = torch.full((1, 16), -8, dtype=torch.int8)
    codes[0, 9] = 7  # second word, element 1 -> bits 4..7 = 0xF
    packed = pack_int4(codes)
    assert packed.tolist() == [[0, 0xF0]]


@pytest.mark.parametrize("n, k", [(1, 8), (3, 16), (5, 128), (7, 13), (4, 1), (2, 260), (64, 2560)])
def test_matches_compressed_tensors(n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ours = pack_int4(codes)
    ref = pack_to_int32(codes, num_bits=4)
    assert ours.dtype == ref.dtype == torch.int32
    assert torch.equal(ours, ref)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size([n, k])), codes)
    assert torch.equal(unpack_int4(ref, k), codes)


def test_accepts_any_integer_dtype():
    codes = torch.randint(-8, 8, (3, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    for dt in (torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_int4(codes.to(dt)), pack_int4(codes))


@pytest.mark.parametrize("bad", [8, -9, 100])
def test_rejects_out_of_range(bad):
    codes = torch.zeros(2, 8, dtype=torch.int8)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match="int4 codes"):
        pack_int4(codes.to(torch.int16))


def test_rejects_float_and_wrong_rank():
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(8, dtype=torch.int8))


def test_unpack_uint4_is_offset_codes():
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)
    assert torch.equal(unpack_uint4(pack_int4(codes), 8), (codes + 8).to(torch.uint8))


def test_dequantize_is_bf16_product():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (4, 256), generator=g, dtype=torch.int8)
    scale = (torch.rand(4, 2, generator=g) + 0.01).to(torch.bfloat16)
    w = dequantize(pack_int4(codes), scale, (4, 256))
    # reference: element by element, code * its group's scale, one bf16 rounding
    ref = torch.empty(4, 256, dtype=torch.bfloat16)
    for i in range(4):
        for j in range(256):
            ref[i, j] = (torch.tensor(float(codes[i, j]), dtype=torch.bfloat16) * scale[i, j // 128])
    assert w.dtype == torch.bfloat16 and torch.equal(w, ref)
    assert group_size_of(256, scale) == 128 and group_size_of(256, scale[:, :1]) == -1


def test_non_contiguous_codes():
    # pack_int4 reinterprets the offset codes as int16 pairs: views (transposed, column slices) must be
    # copied to row-major first, and give compressed-tensors' words
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-8, 8, (40, 72), generator=g, dtype=torch.int8)
    for view in (codes.t(), codes[:, 3:59], codes[::2, 8:], codes.to(torch.int32).t()[5:, :]):
        assert not view.is_contiguous()
        assert torch.equal(pack_int4(view), pack_to_int32(view.contiguous().to(torch.int8), num_bits=4))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_property_roundtrip_and_ct_equivalence(n, k, seed):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (n, -(-k // 8))
    assert torch.equal(packed, pack_to_int32(codes, num_bits=4))
    assert torch.equal(unpack_int4(packed, k), codes)


@pytest.mark.gpu
def test_cuda_packs_same_words():
    codes = torch.randint(-8, 8, (257, 1032), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    assert torch.equal(pack_int4(codes.cuda()).cpu(), pack_int4(codes))


def _words_by_hand(codes: torch.Tensor) -> list[list[int]]:
    """Reference packer in plain Python ints (spec §2.1): nibble ``q + 8`` of element ``8j + i`` at bits ``4i`` of
    word ``j``, rows padded with u = 0, words as int32 two's complement."""
    out = []
    for row in codes.tolist():
        u = [q + 8 for q in row] + [0] * (-len(row) % 8)
        words = [sum(u[8 * j + i] << (4 * i) for i in range(8)) for j in range(len(u) // 8)]
        out.append([w - 2**32 if w >= 2**31 else w for w in words])
    return out


@pytest.mark.parametrize("make", [
    lambda g: torch.randint(-8, 8, (16, 1), generator=g, dtype=torch.int8).t(),   # [1, 16], strides (1, 1)
    lambda g: torch.randint(-8, 8, (13, 1), generator=g, dtype=torch.int8).t(),   # the same, padded
    lambda g: torch.randint(-8, 8, (24, 1), generator=g, dtype=torch.int32).t(),  # other dtype, converted
    lambda g: torch.randint(-8, 8, (1, 40), generator=g, dtype=torch.int8)[:, 3:19],  # [1, 16] at an odd offset
    lambda g: torch.zeros(3, 0, dtype=torch.int8),                                 # K = 0
    lambda g: torch.zeros(0, 16, dtype=torch.int8),                                # N = 0
    lambda g: torch.zeros(0, 0, dtype=torch.int8),
], ids=["1xK transposed", "1xK transposed padded", "int32 transposed", "1xK offset slice", "K=0", "N=0", "0x0"])
def test_contiguous_codes_with_unusual_strides(make):
    """Contiguous tensors whose strides forbid a dtype view (a transposed column, a size-0 dimension) pack like
    any other: the same words as the hand-computed reference and compressed-tensors' packer."""
    codes = make(torch.Generator().manual_seed(11))
    assert codes.is_contiguous()
    n, k = codes.shape
    ours = pack_int4(codes)
    assert ours.dtype == torch.int32 and ours.shape == (n, -(-k // 8))
    assert ours.tolist() == _words_by_hand(codes)
    assert torch.equal(ours, pack_to_int32(codes.to(torch.int8), num_bits=4))
    assert torch.equal(unpack_int4(ours, k), codes.to(torch.int8))
