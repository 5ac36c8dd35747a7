"""pack.stio: the streaming safetensors writer is byte-identical to safetensors' own save_file; bad files fail
with a one-line error that names the file."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from pack import stio
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux-only")
def test_writer_starts_writeback_of_every_byte_once_written(tmp_path, monkeypatch):
    """writeback=True: the writer asks the kernel to start writing every byte of the file to disk, in order, in
    stretches of about WRITEBACK_STEP, each once its bytes are in the file (flushed from the file object's buffer);
    the file is the same. writeback=False asks for nothing."""
    monkeypatch.setattr(stio, "WRITEBACK_STEP", 1 << 20)
    asked: list[tuple[int, int]] = []
    ok: list[bool] = []
    real = stio.start_writeback

    def spy(fd, off, n):
        asked.append((off, n))
        with open(f, "rb") as fh:  # already written (the kernel has them): another reader sees them
            fh.seek(off)
            ok.append(fh.read(n) == expected[off:off + n])
        real(fd, off, n)

    monkeypatch.setattr(stio, "start_writeback", spy)
    g = torch.Generator().manual_seed(5)
    tensors = {"big": torch.randn(1 << 20, generator=g), "small": torch.randn(3, generator=g).bfloat16(),
               "mid": torch.randint(-2**31, 2**31 - 1, (300_000,), generator=g, dtype=torch.int32)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    expected = (tmp_path / "ref.safetensors").read_bytes()
    for writeback in (True, False):
        asked.clear()
        f = tmp_path / f"wb-{writeback}.safetensors"
        w = SafetensorsFileWriter(f, {k: (_st(v.dtype), tuple(v.shape)) for k, v in tensors.items()},
                                  writeback=writeback)
        for name in w.order:
            b = bytes(tensor_bytes(tensors[name]))
            w.write(name, [b[i:i + (300 << 10)] for i in range(0, len(b), 300 << 10)])
        w.close()
        assert f.read_bytes() == expected
        if not writeback:
            assert asked == []
            continue
        assert len(asked) >= 5 and all(ok)
        assert asked[0][0] == 0 and sum(n for _, n in asked) == len(expected)
        assert all(a + n == b for (a, n), (b, _) in zip(asked, asked[1:]))  # contiguous, no byte twice
        assert all(n >= 1 << 20 for _, n in asked[:-1])  # stretches of at least WRITEBACK_STEP, then the tail


def test_writer_reports_a_failed_writeback_instead_of_hanging(tmp_path, monkeypatch):
    """An error on the hashing thread (here: the writeback request) is raised by close(); the writer, which hands
    that thread its work through a bounded queue, does not wait forever on it."""
    monkeypatch.setattr(stio, "WRITEBACK_STEP", 1 << 16)
    monkeypatch.setattr(stio, "_sync_file_range", lambda: (lambda *a: 0))  # present, even off Linux

    def broken(fd, off, n):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stio, "start_writeback", broken)
    got: list = []

    def run():  # in a thread: a writer that does hang fails this test after 30 s instead of stalling the suite
        try:
            w = SafetensorsFileWriter(tmp_path / "x.safetensors", {"a": ("F32", (1 << 18,))}, writeback=True)
            b = bytes(1 << 20)
            w.write("a", [b[i:i + (1 << 14)] for i in range(0, len(b), 1 << 14)])  # more chunks than the queue holds
            w.close()
        except BaseException as e:  # noqa: BLE001 - checked below
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the writer hung on its hashing thread"
    assert len(got) == 1 and isinstance(got[0], RuntimeError), got
    assert re.search(r"x\.safetensors: hashing or writeback failed \(OSError: .*Input/output", str(got[0])), got


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


def test_abort_does_not_wait_on_a_queue_lock_an_interrupt_left_held(tmp_path, monkeypatch):
    """A SIGTERM raised as KeyboardInterrupt inside the writer's ``Queue.put``, just after the put took the queue's
    lock, leaves that lock held: abort() (what the writer's caller runs on the way out) must still return, so that
    the run removes its temp dir and exits, instead of hanging (a mutation audit saw the SIGTERM test hang)."""
    monkeypatch.setattr(stio, "ABORT_JOIN_S", 0.5)
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", {"a": ("F32", (1 << 12,))})
    w.write("a", [bytes(1 << 14)])  # written, not closed
    w._hq.mutex.acquire()  # what the interrupted put left behind
    done = threading.Event()
    t = threading.Thread(target=lambda: (w.abort(), done.set()), daemon=True)
    try:
        t.start()
        t.join(30)
        assert done.is_set(), "abort() hung on the queue's lock"
    finally:
        w._hq.mutex.release()  # the stuck hashing thread ends now
    w._hasher.join(5)
    assert not w._hasher.is_alive()
    w._fh.close()  # left open for the stuck thread; closed here only to keep the test clean


def test_abort_stops_the_thread_and_closes_the_file(tmp_path):
    w = SafetensorsFileWriter(tmp_path / "x.safetensors", {"a": ("F32", (1 << 12,))}, writeback=True)
    w.write("a", [bytes(1 << 14)])
    w.abort()
    assert not w._hasher.is_alive() and w._fh.closed


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


def test_reader_reads_the_files_through_the_descriptors_it_is_given(tmp_path):
    """SourceFiles given a FileHasher's open files reads headers and tensors through them, so what it reads is what
    was hashed even once the path names another file; it leaves them open, and the hasher's close() closes them."""
    from pack.checkpoint import FileHasher

    tensors = _tensors()
    f = tmp_path / "model.safetensors"
    save_file(tensors, f, metadata={"format": "pt"})
    first = f.read_bytes()
    h = FileHasher([f], use_cache=False)
    fds = h.fds
    save_file({"other": torch.ones(3)}, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", f)
    with SourceFiles(tmp_path, opened=fds) as src:
        assert set(src.tensors) == set(tensors)
        assert os.path.samestat(os.fstat(src.fd(f)), os.fstat(fds[f]))   # the file the hasher opened
        assert h.result() == {f.name: hashlib.sha256(first).hexdigest()}
        h.close()   # the hasher's descriptors closed (or its object collected) while the reader still reads
        with pytest.raises(OSError):
            os.fstat(fds[f])
        spare = os.open(tmp_path / "model.safetensors", os.O_RDONLY)   # may take a number the hasher freed
        try:
            for name, t in tensors.items():   # the reader's own copies still read the first file
                assert torch.equal(read_tensor(src, src.tensors[name]), t)
        finally:
            os.close(spare)
    assert h.fds == {} and h.result() == {f.name: hashlib.sha256(first).hexdigest()}
    h.close()  # again: harmless
    with SourceFiles(tmp_path) as src:  # a reader of its own opens the file the path names now
        assert set(src.tensors) == {"other"}


def test_reader_refuses_a_file_its_opener_did_not_open(tmp_path):
    """A file listed now but not among the descriptors given (it could not be opened when the run started, or the
    index listed other files then) is refused as changed: its hash, if any, is not of what would be read."""
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(QuantizeError, match=r"model\.safetensors: changed while pdqkit read it \(it could not be "
                                            r"opened when the run started"):
        SourceFiles(tmp_path, opened={})


REPLACED = r"model\.safetensors: changed while pdqkit read it \(it was replaced after the run opened it\)"


def test_reader_refuses_a_file_replaced_before_its_header_was_checked(tmp_path, monkeypatch):
    """The file the run opened is replaced (rename onto it) before its header is validated: a partial download
    replaced by the complete file is reported as changed, not as corrupt; and without /proc (``safe_open`` is given
    the path, which names the new file) a header checked on one file is never used to read the other."""
    import pack.stio

    f = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 8)}, tmp_path / "full")
    f.write_bytes((tmp_path / "full").read_bytes()[:-10])   # partial
    fd = os.open(f, os.O_RDONLY)
    try:
        os.replace(tmp_path / "full", f)
        with pytest.raises(QuantizeError, match=REPLACED):
            read_header(f, fd)
    finally:
        os.close(fd)
    real_isdir = os.path.isdir
    monkeypatch.setattr(pack.stio.os.path, "isdir", lambda p: False if p == "/proc/self/fd" else real_isdir(p))
    fd = os.open(f, os.O_RDONLY)
    try:
        assert set(read_header(f, fd)) == {"a"}   # the same file: fine without /proc
        save_file({"a": torch.zeros(4, 8)}, tmp_path / "new")
        os.replace(tmp_path / "new", f)
        with pytest.raises(QuantizeError, match=REPLACED):
            read_header(f, fd)
    finally:
        os.close(fd)


@pytest.fixture(params=["path", "descriptor"])
def read_header_of(request):
    """read_header by path, or through an open descriptor (errors name the path either way)."""
    def read(f):
        if request.param == "path":
            return read_header(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            return read_header(f, fd)
        finally:
            os.close(fd)
    return read


def test_truncated_file_fails(good_file, read_header_of):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:-7])
    with pytest.raises(QuantizeError, match=r"model\.safetensors: not a valid safetensors file"):
        read_header_of(good_file)


def test_lying_header_fails(good_file, read_header_of):
    data = good_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["w"]["shape"] = [8, 16]  # claims twice the bytes it has
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    good_file.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with pytest.raises(QuantizeError, match=r"model\.safetensors: .*truncated or corrupt"):
        read_header_of(good_file)


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


def test_file_hasher_matches_hashlib(tmp_path):
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
    assert h.result() == {"model.safetensors": hashlib.sha256(data).hexdigest()}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_file_hasher_cancel_stops_the_child(tmp_path):
    """cancel() kills a child that is still hashing: the child is gone at once and result() says it was cancelled.

    The input is a named pipe that this test holds open for writing, so the child blocks on it until the test
    lets it go: it is certainly still running when cancel() is called. Should cancel() only wait, the pipe is fed
    and closed after a few seconds, the child finishes, and result() returns a hash: the test fails instead of
    hanging."""
    import signal
    import threading
    import time

    from pack.checkpoint import FileHasher

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer end that never blocks: opening the pipe to read does not block
    released = threading.Event()

    def release():  # only if cancel() did not stop the child
        released.set()
        os.write(writer, b"x" * 1000)
        os.close(writer)

    h = FileHasher([fifo], use_cache=False)
    (proc, ) = h._procs
    timer = threading.Timer(5.0, release)
    timer.start()
    try:
        time.sleep(0.3)  # the child has started and opened the pipe (either way it cannot finish before release)
        assert proc.poll() is None
        t0 = time.monotonic()
        h.cancel()
        elapsed = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
    if not released.is_set():
        os.close(writer)
    assert not released.is_set() and elapsed < 4.0  # cancel() did not wait for the child to finish
    assert proc.returncode == -signal.SIGKILL  # killed, and reaped: no process left behind
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    with pytest.raises(RuntimeError, match="input hashing was cancelled"):
        h.result()
    h.cancel()  # again: harmless


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
