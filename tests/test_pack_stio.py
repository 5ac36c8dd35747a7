"""pack.stio: the streaming safetensors writer is byte-identical to safetensors' own save_file; bad files fail
with a one-line error that names the file."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from pack.errors import QuantizeError
from pack.stio import SafetensorsFileWriter, SourceFiles, iter_chunks, read_header, read_tensor, tensor_bytes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight_packed": torch.randint(-2**31, 2**31 - 1, (4, 16), generator=g,
                                                                    dtype=torch.int32),
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(4, 1, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight_shape": torch.tensor([4, 128]),
        "a.norm.weight": torch.randn(7, generator=g).bfloat16(),
        "z.buffer": torch.tensor(float("inf")).bfloat16(),        # 0-d
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "i8": torch.randint(-5, 5, (11,), generator=g, dtype=torch.int8),
        "flag": torch.tensor([True, False, True]),
        "naïve.é\u2028✓.weight": torch.ones(2).bfloat16(),  # non-ASCII names: raw UTF-8 in the header, as save_file
    }


def test_writer_is_byte_identical_to_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    w = SafetensorsFileWriter(tmp_path / "ours.safetensors",
                              {k: (_st(v.dtype), tuple(v.shape)) for k, v in tensors.items()})
    for name in w.order:
        t = tensors[name]
        b = bytes(tensor_bytes(t))
        w.write(name, [b[: len(b) // 2], b[len(b) // 2:]])  # chunked on purpose
    sha = w.close()
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    assert ours == ref
    assert sha == hashlib.sha256(ref).hexdigest()


def test_writer_checks_order_and_sizes(tmp_path):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", {"a": ("BF16", (2,)), "b": ("I64", (1,))})
    assert w.order == ["b", "a"]  # safetensors: larger alignment first
    with pytest.raises(RuntimeError, match="out of order"):
        w.write("a", [b"\0" * 4])
    with pytest.raises(RuntimeError, match="header says 8"):
        w.write("b", [b"\0" * 4])
    w.abort()


def test_writer_closes_its_file_when_the_hash_thread_cannot_start(tmp_path, monkeypatch):
    """An interrupt inside ``Thread.start`` (where CI saw a SIGTERM land) leaves no open file behind."""
    import pack.stio

    opened = []

    def tracking_open(*args, **kwargs):
        fh = open(*args, **kwargs)
        opened.append(fh)
        return fh

    def interrupted_start(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack.stio, "open", tracking_open, raising=False)
    monkeypatch.setattr(pack.stio.threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        SafetensorsFileWriter(tmp_path / "x.safetensors", {"a": ("BF16", (4, 8))})
    assert len(opened) == 1 and opened[0].closed


def test_reader_roundtrip(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SourceFiles(tmp_path) as src:
        assert set(src.tensors) == set(tensors)
        for name, t in tensors.items():
            e = src.tensors[name]
            got = read_tensor(src, e)
            assert got.dtype == t.dtype and torch.equal(got, t)
            raw = b"".join(bytes(c) for c in iter_chunks(src, e, chunk=8))
            assert raw == bytes(tensor_bytes(t))


def _st(dtype):
    from pack.stio import st_dtype
    return st_dtype(dtype)


@pytest.fixture
def good_file(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(8, 8, dtype=torch.bfloat16), "b": torch.zeros(4)}, f, metadata={"format": "pt"})
    return f


def test_truncated_file_fails(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:-7])
    with pytest.raises(QuantizeError, match=r"model\.safetensors: not a valid safetensors file"):
        read_header(good_file)


def test_lying_header_fails(good_file):
    data = good_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["w"]["shape"] = [8, 16]  # claims twice the bytes it has
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    good_file.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with pytest.raises(QuantizeError, match="truncated or corrupt"):
        read_header(good_file)


def test_garbage_file_fails(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(QuantizeError, match="not a valid safetensors file"):
        SourceFiles(tmp_path)


def test_index_must_match_shards(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                      "b": "s2.safetensors"}}))
    with pytest.raises(QuantizeError, match="shard s2.safetensors, which is missing"):
        SourceFiles(tmp_path)
    save_file({"c": torch.ones(2)}, tmp_path / "s2.safetensors")
    with pytest.raises(QuantizeError, match="says b is in s2.safetensors"):
        SourceFiles(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(QuantizeError, match="PyTorch weights"):
        SourceFiles(tmp_path)


def test_file_hasher_matches_hashlib_and_cancels(tmp_path):
    """The background input hasher (started by the CLI before torch is imported) gives each file's sha256."""
    from pack.checkpoint import FileHasher, safetensors_files, sha256_file

    data = os.urandom(3 << 20)
    (tmp_path / "model.safetensors").write_bytes(data)
    files, weight_map = safetensors_files(tmp_path)
    assert files == [tmp_path / "model.safetensors"] and weight_map is None
    h = FileHasher(files, chunk=1 << 20)  # several chunks
    assert h.result() == {"model.safetensors": hashlib.sha256(data).hexdigest()}
    assert h.result()["model.safetensors"] == sha256_file(files[0])
    h.cancel()  # after the result: harmless
    stopped = FileHasher(files, chunk=1 << 10, use_cache=False)  # a child to stop, whatever the cache holds
    stopped.cancel()  # stopped mid-file, or already done: never a hash of part of the file
    try:
        assert stopped.result() == h.result()
    except RuntimeError as e:
        assert "cancelled" in str(e)


def test_file_hasher_child_reports_unreadable_file(tmp_path):
    """The hasher's child process (pack/sha256.py) turns a file it cannot read into one line naming the file;
    result() raises it, and no hash of the other files is returned half-done."""
    from pack.checkpoint import FileHasher

    good = tmp_path / "model-00001-of-00002.safetensors"
    good.write_bytes(b"x" * 100)
    gone = tmp_path / "model-00002-of-00002.safetensors"  # listed but missing: the child cannot open it
    h = FileHasher([good, gone])
    with pytest.raises(OSError, match=r"hashing the input failed: .*model-00002-of-00002\.safetensors: cannot read"):
        h.result()
    h.cancel()  # after a failure: harmless
