"""Streaming safetensors I/O: read one tensor at a time, write a file tensor by tensor.

Why not ``safetensors.torch.load_file`` / ``save_file``: those hold a whole shard in memory (E4B's single
compressed file is ~10 GB), and reading through ``safe_open``'s memory map leaves every page it touched
resident in this process (RSS grows to the size of everything read). pdqkit keeps one tensor (the largest
Linear weight's row block, or a 4 MiB chunk of a passthrough tensor) per worker in memory instead:

* **Reading**: every input file is first opened with the safetensors library itself (``safe_open``), which
  validates the header against the file (truncation, lying shapes/offsets, holes); then tensors are read with
  ``os.pread`` at the offsets of that validated header.
* **Writing**: :class:`SafetensorsFileWriter` writes the exact bytes ``safetensors.torch.save_file(tensors,
  metadata=...)`` would write: the library is asked for its tensor order (dtype alignment, then name: it
  serialises zero-length stand-ins), offsets follow that order, the header is the same compact JSON padded
  with spaces to 8 bytes. Tensors are then streamed in that order and hashed on the way (sha256, in a thread),
  into a file whose blocks are reserved up front (``fallocate``: writes into delayed-allocation pages cost the
  kernel up to ~10x more). With ``writeback``, the kernel is asked to start writing each completed stretch of the
  file to disk as the writer goes (``sync_file_range``), so that the fsync before the output is renamed into
  place (:func:`pack.checkpoint.atomic_output_dir`) waits only for the tail.
  ``tests/test_pack_stio.py`` checks byte equality with ``save_file``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import struct
import sys
import threading
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import INDEX_NAME, SINGLE_NAME, safetensors_files
from .errors import QuantizeError
from .hashcache import FileState, fd_state, file_state

__all__ = [
    "ST_DTYPES", "TensorEntry", "raw_header", "read_header", "SourceFiles", "read_tensor", "read_bytes",
    "iter_chunks", "tensor_bytes", "start_writeback", "SafetensorsFileWriter", "INDEX_NAME", "SINGLE_NAME",
]

CHUNK = 4 << 20  # bytes per read/write of a passthrough tensor (small buffers: reused by the allocator)
MAX_HEADER = 100_000_000  # the longest header safetensors accepts (bytes)
WRITEBACK_STEP = 8 << 20  # with writeback: bytes written between two requests to start writing them to disk

# safetensors dtype string -> torch dtype (the ones torch can hold)
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def st_dtype(dtype: torch.dtype) -> str:
    return _TORCH_TO_ST[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an input file: absolute byte range ``[start, end)`` in ``file``."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in ST_DTYPES and ST_DTYPES[self.dtype].is_floating_point


def _changed(path: Path, why: str) -> QuantizeError:
    return QuantizeError(f"{path}: changed while pdqkit read it ({why}); nothing was written: run again once the "
                         f"checkpoint is complete")


def _names_fd_file(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open as ``fd`` (same device and inode)."""
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def raw_header(fd: int) -> tuple[dict, int]:
    """The JSON header of the safetensors file open as ``fd`` and the offset its data starts at, read with
    ``pread`` (no offset moved), unchecked against the data; OSError, struct.error or ValueError (JSON, too long,
    not an object) if it does not read."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER:   # (do not try to allocate it)
        raise ValueError(f"header length {n}")
    header = json.loads(os.pread(fd, n, 8))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def read_header(path: Path, fd: int | None = None) -> dict[str, TensorEntry]:
    """Validate ``path`` with safetensors' own ``safe_open`` and return its tensors (absolute offsets).

    ``fd``: the file open as that descriptor is what gets validated and read (default: ``path`` opened here);
    read its tensors through it too. On Linux ``safe_open`` is given ``/proc/self/fd/N``, the file behind the
    descriptor even once ``path`` names another; without /proc it is given ``path``, which must then still name
    the descriptor's file. Errors name ``path``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise QuantizeError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            return read_header(path, fd)
        finally:
            os.close(fd)
    via = Path(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else path
    try:
        with safe_open(str(via), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        if not _names_fd_file(path, fd):   # e.g. a partial file replaced by a complete one
            raise _changed(path, "it was replaced after the run opened it") from None
        if isinstance(e, OSError) and via != path:   # (its message names /proc, not the file, and maybe no reason)
            try:
                os.close(os.open(via, os.O_RDONLY))
                reason = e.strerror or type(e).__name__
            except OSError as again:
                reason = again.strerror
            raise QuantizeError(f"{path}: cannot read it any more (opening it again to check it failed: {reason}); "
                                f"run again once it can be read") from None
        raise QuantizeError(f"{path}: not a valid safetensors file ({e}); the file is truncated or corrupt: "
                            f"re-download or re-save the checkpoint") from None
    if via == path and not _names_fd_file(path, fd):   # checked one file, would read another
        raise _changed(path, "it was replaced after the run opened it")
    try:   # a second read: the file may have changed since safe_open validated it
        header, base = raw_header(fd)
    except (OSError, struct.error, ValueError) as e:   # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise _changed(path, f"its header no longer reads as the one just validated: {type(e).__name__}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise QuantizeError(f"{path}: tensor {name} has dtype {info['dtype']}, which pdqkit cannot read; "
                                f"save the checkpoint in bf16")
        a, b = info["data_offsets"]
        out[name] = TensorEntry(name, path, info["dtype"], tuple(info["shape"]), base + a, base + b)
    return out


class SourceFiles:
    """The safetensors files of an HF checkpoint dir (``model.safetensors`` or an index + shards).

    Each file is opened once and read only through that open file (``pread``), header and tensors, so the run
    reads one version of it. ``opened``: ``{file: descriptor}`` of the files already open (a
    :class:`pack.checkpoint.FileHasher`'s, whose hashes are then of the same bytes): each is duplicated (``dup``:
    the same open file, a descriptor of this object's own, so the owner may close its own at any time); a file
    listed now but missing from ``opened`` is refused as changed (it could not be opened then, or the index was
    rewritten since). :attr:`states` holds each file's state (path, inode, size, times) from before its header
    was read; :meth:`check_unchanged` says whether the files are still those (the run read one version of each)."""

    def __init__(self, ckpt: Path, opened: dict[Path, int] | None = None):
        self.dir = Path(ckpt)
        self.files, weight_map = safetensors_files(self.dir)
        self._fds: dict[Path, int] = {}   # every one of them this object's own, closed by close()
        self.states: dict[Path, FileState] = {}
        self.tensors: dict[str, TensorEntry] = {}
        try:
            for f in self.files:
                seen = time.time_ns()
                try:
                    if opened is not None and f not in opened:
                        os.close(os.open(f, os.O_RDONLY))   # the reason it could not be opened, if it still holds
                        raise _changed(f, "it could not be opened when the run started, or was not listed then")
                    self._fds[f] = os.dup(opened[f]) if opened is not None else os.open(f, os.O_RDONLY)
                    self.states[f] = fd_state(f, self._fds[f], seen)
                except OSError as e:
                    raise QuantizeError(f"{f}: cannot read it ({e.strerror})") from None
            for f in self.files:
                for name, e in read_header(f, self._fds[f]).items():
                    if name in self.tensors:
                        raise QuantizeError(f"{f}: tensor {name} also appears in {self.tensors[name].file.name}; "
                                            f"the checkpoint's shards overlap: re-save it")
                    self.tensors[name] = e
            if weight_map is not None:
                index_f = self.dir / INDEX_NAME
                for name, f in weight_map.items():
                    e = self.tensors.get(name)
                    if e is None or e.file.name != f:
                        raise QuantizeError(f"{index_f}: says {name} is in {f}, but it is not there; the index "
                                            f"does not match the shards: re-save the checkpoint")
        except BaseException:
            self.close()
            raise

    @property
    def nbytes(self) -> int:
        """The files' sizes as :attr:`states` recorded them (no I/O: the files may be gone by now)."""
        return sum(st.size for st in self.states.values())

    def check_unchanged(self, earlier: dict[Path, FileState] | None = None, strict: bool = True) -> None:
        """Raise QuantizeError if a safetensors file is no longer the one :attr:`states` describes, or
        (``earlier``: states taken before, e.g. when the input hasher started) was not that one then either:
        written, touched or replaced while the run read it, so its bytes, its header and its lineage hash may be
        of different versions. ``strict``: compare path, device, inode, size, mtime and ctime; False: size and
        mtime only (filesystems whose inode numbers or ctimes are not stable; ``--no-hash-cache``)."""
        def same(a: FileState, b: FileState) -> bool:
            return a.same_file(b) if strict else (a.size, a.mtime_ns) == (b.size, b.mtime_ns)

        for f in self.files:
            then = [self.states[f]] + ([earlier[f]] if earlier and f in earlier else [])
            try:
                now = file_state(f)
            except OSError as e:
                raise QuantizeError(f"{f}: cannot read it any more ({e.strerror}): it changed while pdqkit read "
                                    f"it; nothing was written: run again once the checkpoint is complete") from None
            if not all(same(now, s) for s in then):
                raise QuantizeError(f"{f}: changed while pdqkit read it (its size, inode or times are not those "
                                    f"of the start of the run); nothing was written: run again once the "
                                    f"checkpoint is complete")

    def fd(self, path: Path) -> int:
        """The descriptor ``path`` (one of :attr:`files`) is read through."""
        return self._fds[path]

    def close(self) -> None:
        """Close this object's descriptors (``opened``'s owner keeps its own)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pread_into(fd: int, buf, offset: int) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise QuantizeError(f"unexpected end of file while reading at byte {offset + done}; "
                                f"the file changed while pdqkit was reading it")
        done += n


def read_tensor(src: SourceFiles, e: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or rows ``[r0, r1)`` of its first dim) into private, non-mmapped memory."""
    shape, start = e.shape, e.start
    if rows is not None:
        r0, r1 = rows
        row_bytes = e.nbytes // e.shape[0]
        shape, start = (r1 - r0, *e.shape[1:]), e.start + r0 * row_bytes
    t = torch.empty(shape, dtype=e.torch_dtype)
    if t.numel():
        _pread_into(src.fd(e.file), t.view(-1).view(torch.uint8).numpy(), start)
    return t


def read_bytes(src: SourceFiles, e: TensorEntry, offset: int, n: int) -> bytearray:
    """``n`` raw bytes of tensor ``e`` from byte ``offset`` of its data."""
    buf = bytearray(n)
    if n:
        _pread_into(src.fd(e.file), buf, e.start + offset)
    return buf


def iter_chunks(src: SourceFiles, e: TensorEntry, chunk: int = CHUNK) -> Iterable[bytearray]:
    """The raw bytes of one tensor, ``chunk`` bytes at a time (chunk is a multiple of every dtype size)."""
    for off in range(0, e.nbytes, chunk):
        yield read_bytes(src, e, off, min(chunk, e.nbytes - off))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of ``t`` (any dtype, including bf16 and 0-d)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@functools.cache
def _libc(name: str, *argtypes: str):
    """libc's function ``name`` as a ctypes function taking ``argtypes`` (ctypes type names) and returning an int,
    looked up once; None off Linux or where this libc has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    f.argtypes = tuple(getattr(ctypes, t) for t in argtypes)
    f.restype = ctypes.c_int
    return f


def _fallocate():
    return _libc("fallocate", "c_int", "c_int", "c_int64", "c_int64")


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for a file about to be written in full (Linux ``fallocate(2)``, mode 0).

    Why: ext4 (and others) otherwise allocate blocks page by page as the writes land (delayed allocation); on a
    disk that just freed the previous output (``--force``, mounted with ``discard``) those writes cost up to
    ~1.5 s of kernel time per GB, against ~0.1 s into preallocated extents. Only an optimisation: the file's
    bytes are the same (every byte is written), and where the call is missing or refused nothing happens
    (unlike ``posix_fallocate``, which glibc emulates by writing a zero into every block).
    """
    if size <= 0 or not sys.platform.startswith("linux"):
        return
    fallocate = _fallocate()
    if fallocate is not None:
        fallocate(fd, 0, 0, size)  # -1 (EOPNOTSUPP, ENOSPC...): plain writes report any real problem


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait for it


def _sync_file_range():
    return _libc("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing bytes ``[offset, offset + n)`` of ``fd`` to disk, without waiting (Linux
    ``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``; nothing elsewhere).

    Why: without it the kernel writes an output's dirty pages back only ~30 s later or under memory pressure, so
    the fsync that makes the output durable would write the whole file at the end (~0.23 s for 600 MB on the CPU
    machine). Started as the writer goes, the disk writes overlap the streaming and the fsync waits for the tail.
    Only a head start: it syncs no metadata and flushes no disk cache; the fsync is what makes the data durable
    (and reports any error: one here is ignored)."""
    f = _sync_file_range()
    if f is not None and n > 0:
        f(fd, offset, n, SYNC_FILE_RANGE_WRITE)


def _safetensors_order(specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list[str]:
    """Ask safetensors in which order ``save_file`` lays these tensors out (it depends on dtype and name)."""
    from safetensors.torch import save

    blob = save({n: torch.empty(0, dtype=ST_DTYPES[d]) for n, (d, _) in specs.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]


ABORT_JOIN_S = 5.0  # how long abort() waits for the hashing thread (a sync_file_range may be slow)


class SafetensorsFileWriter:
    """Write one safetensors file tensor by tensor, byte-identical to ``save_file`` of the same tensors.

    ``specs``: name -> (safetensors dtype string, shape). Call :meth:`write` once per tensor, in
    :attr:`order`; :meth:`close` checks completeness and returns the file's sha256.

    ``writeback``: start writing the file to disk as it is written (:func:`start_writeback`, every
    :data:`WRITEBACK_STEP` bytes and the tail at :meth:`close`), on the hashing thread, so that a later fsync of the
    file (the caller's: :func:`pack.checkpoint.atomic_output_dir` with ``fsync``) finds most of it on disk already.
    The file's bytes do not depend on it.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, writeback: bool = False):
        self.path = Path(path)
        metadata = {"format": "pt"} if metadata is None else metadata
        self.order = _safetensors_order(specs, metadata)
        self.sizes, header, offset = {}, {"__metadata__": metadata}, 0
        for name in self.order:
            dtype, shape = specs[name]
            size = prod(shape) * torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # raw UTF-8, as safetensors
        hb += b" " * (-len(hb) % 8)
        self.total = 8 + len(hb) + offset
        self._fh = open(self.path, "wb")
        try:
            _preallocate(self._fh.fileno(), self.total)
        except BaseException:
            self._fh.close()
            raise
        # sha256 in its own thread (hashlib releases the GIL): hashing overlaps the writes
        self._sha = hashlib.sha256()
        self._hq: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None  # raised in the hashing thread, reported by close()
        self._stop = threading.Event()  # abort(): the thread ends without anything more from the queue
        self._writeback = writeback and _sync_file_range() is not None
        self._hasher = threading.Thread(target=self._hash_loop, name="pdqkit-sha256-out", daemon=True)
        try:
            self._hasher.start()
        except BaseException:  # e.g. interrupted: close the file; a thread that did start ends on the stop (with
            self._stop.set()   # nothing queued yet it never uses the file)
            self._fh.close()
            raise
        self._next = 0
        self._started = 0  # bytes [0, _started) were handed to start_writeback
        try:
            self._emit(struct.pack("<Q", len(hb)) + hb)
        except BaseException:  # e.g. disk full: no open file or running thread left behind
            self.abort()
            raise

    def _hash_loop(self) -> None:
        # data to hash, or (offset, n): a range written and flushed, to start writing to disk. Here rather than on
        # the writer's thread: sync_file_range may block while the disk's request queue is full. An error is kept
        # for close() and the queue still drained: the writer must never block on a dead thread. The timeout:
        # abort() stops the thread through an Event, not through the queue (whose lock it cannot trust).
        while not self._stop.is_set():
            try:
                item = self._hq.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                break
            if self._error is not None:
                continue
            try:
                if type(item) is tuple:
                    start_writeback(self._fh.fileno(), *item)  # the file is closed only after this thread ended
                else:
                    self._sha.update(item)
            except BaseException as e:  # noqa: BLE001 - reported by close()
                self._error = e

    def _emit(self, data) -> None:
        self._fh.write(data)
        self._hq.put(data)
        if self._writeback and self._fh.tell() - self._started >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        self._fh.flush()  # the small tensors wait in the file object's buffer: the kernel must have them
        end = self._fh.tell()
        if end > self._started:
            self._hq.put((self._started, end - self._started))
            self._started = end

    def write(self, name: str, chunks: Iterable) -> None:
        """Write tensor ``name`` (the next one in :attr:`order`) from an iterable of byte buffers.

        The buffers are hashed on another thread after this returns: a caller must not modify or reuse a buffer it
        passed (every caller hands over fresh ones)."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path.name}: wrote {name} out of order (expected {want})")
        n = 0
        for c in chunks:
            self._emit(c)
            n += len(memoryview(c).cast("B"))
        if n != self.sizes[name]:
            raise RuntimeError(f"{self.path.name}: tensor {name} got {n} bytes, its header says {self.sizes[name]}")
        self._next += 1

    def close(self) -> str:
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path.name}: only {self._next} of {len(self.order)} tensors written")
        if self._fh.tell() != self.total:  # preallocation set the size up front: check every byte was written
            raise RuntimeError(f"{self.path.name}: wrote {self._fh.tell()} bytes, the layout says {self.total}")
        if self._writeback:
            self._start_writeback()  # the tail: written while the caller finishes the output
        else:
            self._fh.flush()  # a full disk is reported here, before the hash thread is stopped
        self._hq.put(None)
        self._hasher.join()  # before the file is closed: the thread may still use its descriptor
        self._fh.close()
        if self._error is not None:
            raise RuntimeError(f"{self.path.name}: hashing or writeback failed "
                               f"({type(self._error).__name__}: {self._error})") from self._error
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Stop the hashing thread and close the file (the caller removes it), without blocking on the queue.

        A KeyboardInterrupt raised inside ``Queue.put``, after it took the queue's lock and before the ``with``
        block that releases it is set up, leaves the lock held: the thread waits on it for ever, and a ``put`` here
        would too (a mutation audit's run of the SIGTERM test hung for 11 min). pack's tools no longer raise a stop
        signal there (pack/stopsignals.py), but another caller's handler may. So the thread is told through an
        Event and given :data:`ABORT_JOIN_S` to end. A thread that does not end is stuck on that lock: its file is
        left open (it may still use the descriptor; the process is being interrupted and ends soon) and abort
        returns."""
        self._stop.set()
        self._hasher.join(timeout=ABORT_JOIN_S)
        if not self._hasher.is_alive():
            self._fh.close()  # may fail flushing (disk full): raised after the thread has stopped
