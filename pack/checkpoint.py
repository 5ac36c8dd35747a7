"""Checkpoint plumbing shared by every pdqkit stage: atomic output directories, the bf16 HF writer, lineage.

* :func:`atomic_output_dir` — write into a hidden temp dir beside the target and rename at the end, so an
  interrupted run (even ``kill -9``) never leaves a checkpoint-looking directory behind; with ``fsync``, every file
  is on disk before the rename and the rename is on disk when it returns (a crash or power loss cannot leave a
  complete-looking output with unwritten blocks).
* :func:`save_bf16_checkpoint` — ``save_pretrained`` a model as bf16 safetensors that BOTH loaders accept:
  vLLM 0.26.0 refuses unquantized Gemma-4 checkpoints with KV-shared layers unless their (unused) ``k_norm``
  weights are present, and transformers never writes them, so we add ones-filled ``k_norm`` tensors for those
  layers (transformers then ignores them as unexpected keys).
* Lineage: every stage appends one step (spec pack-quantized.md §6) to ``pdqkit_lineage.json``; pack.quantize
  carries the list into ``quant_recipe.json``'s ``source_lineage``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

from . import hashcache  # standard library only, like the next two
from .errors import QuantizeError
from .sha256 import CHUNK, sha256_files  # standard library only: keeps this module torch-free

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
KNORM_SHARD = "model-knorm.safetensors"  # the KV-shared k_norm tensors of a sharded bf16 checkpoint
LINEAGE_FILE = "pdqkit_lineage.json"
RECIPE_FILE = "quant_recipe.json"
LINEAGE_SCHEMA = "pdqkit_lineage/1"
# Non-weight files a Gemma-4 checkpoint carries that loaders (HF processor, vLLM) need: copied verbatim.
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "chat_template*", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json",
    "added_tokens.json", "*.model", "vocab*", "merges.txt",
)

__all__ = [
    "SINGLE_NAME", "INDEX_NAME", "KNORM_SHARD", "index_shards", "safetensors_files", "FileHasher", "LINEAGE_FILE",
    "RECIPE_FILE", "base_step", "atomic_output_dir", "fsync_dir", "fsync_tree", "InterruptedAfterCommit",
    "OutputAppeared", "UnsyncedAfterCommit", "copy_aux_files",
    "sha256_file", "read_lineage", "write_lineage", "lineage_step", "kv_shared_k_norm_tensors",
    "save_bf16_checkpoint", "json_dump", "check_writable_parent", "check_replaceable", "usual_file_modes",
]


def json_dump(obj, path: Path) -> None:
    """Deterministic JSON (sorted keys, indent 2, trailing newline)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output_dir(out: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output directory that is, contains or lies inside one of ``inputs`` (``{what: path}``), compared
    resolved (symlinks and ``..``), so that no spelling of a path lets a run replace or delete what it reads:
    ``ValueError`` naming both."""
    out_r = Path(out).resolve()
    for name, path in inputs.items():
        in_r = Path(path).resolve()
        if out_r == in_r or out_r in in_r.parents or in_r in out_r.parents:
            raise ValueError(f"{out}: the output directory must not be, contain or lie inside the {name} {path}")


def check_writable_parent(path: str | os.PathLike, option: str) -> None:
    """Make sure a folder can be created beside ``path``: a probe folder is made and removed in the deepest folder
    that exists on the way (nothing is left, no parent created), found before a run's work, not after it.
    ValueError naming ``option`` (e.g. ``-o``) otherwise."""
    path = Path(path)
    here = path.absolute().parent
    while not os.path.lexists(here) and here != here.parent:
        here = here.parent
    try:
        if not here.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(here))
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=here))
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write there ({e.strerror or e}: {e.filename or here}); pass "
                         f"a path in a writable folder") from None


OUTPUT_MARKERS = ("pdqkit_lineage.json", "quant_recipe.json", SINGLE_NAME, INDEX_NAME)


def check_replaceable(out: str | os.PathLike) -> None:
    """What ``--force`` may replace at ``out``: nothing, a symlink, an empty folder, or an earlier output (a
    folder with a ``config.json`` and a lineage file or the weights); FileExistsError for a file or a folder of
    anything else (``-o . --force`` in a project folder would have deleted its files)."""
    out = Path(out)
    if out.is_symlink() or not os.path.lexists(out):
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: a file, not an output directory; --force replaces only a checkpoint "
                              f"directory: move the file away or choose another output")
    if any(out.iterdir()) and not ((out / "config.json").exists()
                                   and any(os.path.lexists(out / m) for m in OUTPUT_MARKERS)):
        raise FileExistsError(f"{out}: a folder with files but not a checkpoint (no config.json with weights or a "
                              f"lineage file); --force replaces only a checkpoint directory: empty it yourself or "
                              f"choose another output")


class InterruptedAfterCommit(KeyboardInterrupt):
    """An interruption (Ctrl-C, SIGTERM) that arrived after :func:`atomic_output_dir` had put the new output in
    place, while it deleted the previous copy: the output is complete; ``old`` may be left behind."""

    def __init__(self, out: Path, old: Path | None, just_committed: bool = False):
        if just_committed:   # interrupted the moment the rename returned
            msg = f"{out} was written; interrupted as it was put in place" + (
                f"; the previous copy remains at {old} (delete it)" if old is not None else "")
        elif old is None:   # interrupted while the directory entries were synced (atomic_output_dir's fsync)
            msg = (f"{out} was written; interrupted while syncing it to disk (a crash before the system syncs may "
                   "lose it)")
        else:
            msg = (f"{out} was written; interrupted while deleting the previous copy, which may remain at {old} "
                   "(delete it)")
        super().__init__(msg)
        self.out, self.old = out, old


class OutputAppeared(FileExistsError):
    """:func:`atomic_output_dir` found ``out`` in place when it came to rename its output there (another run wrote
    it meanwhile, e.g. two runs with the same default output dir; with ``force``, after this run had moved the
    previous copy aside): nothing was written, and the other output is kept."""


class UnsyncedAfterCommit(OSError):
    """Syncing the directory entries failed after :func:`atomic_output_dir` had put the new output in place: the
    output is complete, but whether it survives a crash is not known."""

    def __init__(self, out: Path, err: OSError):
        super().__init__(err.errno, f"{out} was written, but syncing it to disk failed ({err.strerror or err}): it "
                                    f"may not survive a crash; run `sync`, or write it again with --force")
        self.out = out


_NO_SYNC = (errno.EINVAL, errno.ENOTSUP)  # "this filesystem does not sync": not an I/O error


def fsync_dir(d: Path) -> None:
    """fsync a directory: its entries (files created or renamed in it) reach the disk. Skipped where a directory
    cannot be opened or synced (not POSIX; a filesystem that refuses: EINVAL), which makes its renames as durable
    as it does."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_SYNC + (errno.EBADF,):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Make every file under ``root`` and every directory entry of it durable: the files' data first (``fdatasync``:
    the data and the size, not the times), then each directory, deepest first; a file ``root``: its data only.
    Raises OSError (EIO: the data did not reach the disk). Files whose writeback was started
    (:func:`pack.stio.start_writeback`) cost only their tail."""
    root = Path(root)
    if root.is_file() and not root.is_symlink():
        _fsync_file(root)
        return
    dirs = []
    for top, _, names in os.walk(root):
        dirs.append(Path(top))
        for name in sorted(names):
            f = Path(top) / name
            if f.is_symlink():  # its target is not ours to sync; the link itself is a directory entry
                continue
            _fsync_file(f)
    for d in reversed(dirs):
        fsync_dir(d)


def _fsync_file(f: Path) -> None:
    sync = getattr(os, "fdatasync", os.fsync)
    fd = os.open(f, os.O_RDONLY)
    try:
        sync(fd)
    except OSError as e:   # a filesystem with no file sync at all: as durable as it makes it
        if e.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


def _put_back(old: Path | None, out: Path) -> Path | None:
    """Undo :func:`atomic_output_dir`'s move of the previous ``out`` to ``old / "x"``: None when it is back (or
    there was none), else where it still is (another run's output took its place meanwhile)."""
    if old is None:
        return None
    if not os.path.lexists(old / "x"):   # interrupted between making ``old`` and moving ``out`` into it
        with contextlib.suppress(OSError):
            old.rmdir()
        return None
    try:
        os.rename(old / "x", out)
    except OSError:
        return old / "x"
    with contextlib.suppress(OSError):
        old.rmdir()
    return None


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir next to ``out``; on success replace ``out`` with it, on any error delete it (and the
    parent directories it created; an ``out`` it had moved aside is put back).

    The temp dir is named ``.<name>.tmp-XXXX`` (hidden, not checkpoint-looking). Raises ``FileExistsError``
    up front when ``out`` exists and ``force`` is false, and :class:`OutputAppeared` at the end if it appeared
    meanwhile (the rename never replaces it then). ``out``'s parent is resolved (``..``, symlinks), so the
    renames never run through a directory that one of them moves.

    ``fsync``: durable output. Before the rename every file and directory of the temp dir is synced
    (:func:`fsync_tree`), after it ``out``'s parent (and the parents of directories this call created), so that a
    crash or power loss never leaves an ``out`` of the right files whose blocks were never written back
    (preallocated, they read as zeros), and an ``out`` there once this returns stays there. Without it the rename
    may reach the disk before the data. (A crash in the middle of a ``force`` swap can leave the previous copy at
    ``.<name>.old-XXXX/x``, as can another run whose output takes ``out``'s place in that moment: the error
    then names the folder.)
    """
    out = Path(out).absolute()
    out = out.parent.resolve() / out.name
    if os.path.lexists(out) and not force:   # lexists: a dangling symlink is in the way too
        raise FileExistsError(f"{out}: output directory exists; pass --force to overwrite it")
    if force:
        check_replaceable(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]   # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None   # set while this run holds the previous copy aside, at old / "x"
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a checkpoint dir is an ordinary directory
        if fsync:
            fsync_tree(tmp)
        if force and os.path.lexists(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.replace(out, old / "x")
            except FileNotFoundError:   # moved aside meanwhile by another --force run: nothing to replace now
                old.rmdir()
                old = None
        # rename(2) never replaces a non-empty directory (nor a directory a file): an ``out`` that another run
        # wrote while this one ran is kept, and this run fails instead of both reporting success
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                fix = "run again" if force else "pass --force to replace it"
                raise OutputAppeared(e.errno, f"{out}: appeared while this run wrote its output (another run?); "
                                              f"nothing was written; {fix}") from None
            raise
    except BaseException as e:
        if not tmp.exists():   # renamed: only an interruption can land after the rename returned
            raise InterruptedAfterCommit(out, old, just_committed=True) from None
        shutil.rmtree(tmp, ignore_errors=True)
        stranded = _put_back(old, out)
        for p in made:   # only directories this call created, and only while empty
            try:
                p.rmdir()
            except OSError:
                break
        if stranded is None:
            raise
        # the previous copy could not go back: say where it is, in the one line the CLI prints
        note = f"the copy it was to replace is at {stranded}, since another output took its place"
        if isinstance(e, OSError) and e.strerror:   # OutputAppeared, or the rename's own error
            raise type(e)(e.errno, f"{e.strerror}; {note}") from None
        if type(e) is KeyboardInterrupt:
            raise KeyboardInterrupt(note) from None
        if hasattr(e, "add_note"):   # Python >= 3.11
            e.add_note(note)
        raise
    if old is not None:   # the new output is in place: an interruption from here on must not say otherwise
        try:
            shutil.rmtree(old, ignore_errors=True)
        except KeyboardInterrupt:
            raise InterruptedAfterCommit(out, old) from None
    if fsync:  # the rename (and the previous copy's removal, the directories this call made) on disk too
        try:
            for d in [out.parent, *(p.parent for p in made)]:
                fsync_dir(d)
        except KeyboardInterrupt:   # the output is in place: never "nothing was written" from here on
            raise InterruptedAfterCommit(out, None) from None
        except OSError as e:
            raise UnsyncedAfterCommit(out, e) from e


def copy_aux_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer / processor / generation files of checkpoint ``src`` into ``dst``; returns the names copied."""
    if src is None:
        return []
    src, dst = Path(src), Path(dst)
    copied = []
    for pattern in AUX_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """sha256 hex of one file (:func:`pack.sha256.sha256_files`, in this process)."""
    return sha256_files([Path(path)], chunk)[Path(path).name]


def index_shards(index_f: Path, kind: str) -> tuple[list[Path], dict[str, str]]:
    """The shard files a checkpoint's index file ``index_f`` names (beside it, each once, sorted) and its
    ``weight_map``; ``kind`` ("safetensors", "PyTorch") names the index in messages. Raises
    :class:`QuantizeError` naming the fix: not an index, a shard that is not a file name beside it, or missing."""
    try:
        weight_map = json.loads(index_f.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise QuantizeError(f"{index_f}: not a valid {kind} index ({type(e).__name__}: {e}); "
                            f"fix or delete it") from None
    for f in files:
        if Path(f).name != f:
            raise QuantizeError(f"{index_f}: shard {f} is not a file name beside the index (as save_pretrained "
                                f"writes them); re-save the checkpoint with save_pretrained")
        if not (index_f.parent / f).is_file():
            raise QuantizeError(f"{index_f}: lists shard {f}, which is missing from {index_f.parent}; "
                                f"copy the complete checkpoint")
    return [index_f.parent / f for f in files], weight_map


def safetensors_files(ckpt: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of HF checkpoint dir ``ckpt`` (``model.safetensors``, or the shards its index names)
    and the index's ``weight_map`` (None without an index). Raises :class:`QuantizeError` naming the fix.

    In ``from_pretrained``'s order: a folder holding both ``model.safetensors`` and an index is
    ``model.safetensors`` (what transformers, llmcompressor, prune and distill load; before the forty-fourth
    session pack read the index's shards there)."""
    ckpt = Path(ckpt)
    index_f, single_f = ckpt / INDEX_NAME, ckpt / SINGLE_NAME
    if single_f.is_file():
        return [single_f], None
    if index_f.is_file():
        return index_shards(index_f, "safetensors")
    bins = sorted(p.name for p in ckpt.glob("*.bin"))
    hint = (f"it has PyTorch weights ({bins[0]}): re-save it with save_pretrained() to get safetensors"
            if bins else "pass a Hugging Face checkpoint directory")
    raise QuantizeError(f"{ckpt}: no {SINGLE_NAME} or {INDEX_NAME}; {hint}")


class FileHasher:
    """sha256 of ``files``, computed by a child process (:mod:`pack.sha256`) on another core while this one
    imports torch and transformers; :meth:`result` waits for it, :meth:`cancel` stops it early, :meth:`close`
    also closes the files.

    A process, not a thread: a hashing thread convoys with the importing main thread on the GIL (why, and what
    it cost: :mod:`pack.sha256`). The child runs that module's file with the standard library only (``-I -S``:
    isolated, no site packages, so it starts in ~30 ms and needs pdqkit on no path). Torch-free:
    ``python -m pack.quantize`` starts it before importing torch.

    The files are opened once, here, and stay open until :meth:`close`: the child hashes them through these
    descriptors (inherited), and :class:`pack.stio.SourceFiles` reads headers and tensors through them
    (:attr:`fds`). So the hash and the tensors are of one version of each file even if it is replaced (a rename
    onto it) while the run reads it, a change that a check by size and mtime alone (``use_cache=False``, for
    filesystems without stable inodes or ctimes) cannot see. A file that cannot be opened is passed to the child
    by path, which reports it.

    ``workers``: hash in up to this many children at once, each a share of the files (balanced by size; one
    file is never split). 1, the default, is what ``pack.quantize`` wants on a 2-core machine: one core hashes
    while the other imports and quantizes. A caller with idle cores and nothing else to do meanwhile (distill,
    hashing its models) gains up to ``workers``-fold on a multi-shard checkpoint.

    ``use_cache``: take the hashes of unchanged files from the input-hash cache (:mod:`pack.hashcache`) and
    store the new ones there; the child hashes only the others, and is not started when there are none
    (:attr:`cached` counts the files found). False: hash every file, store nothing. The files' names must differ
    (the result is keyed by name, as the lineage is): ValueError otherwise.
    """

    def __init__(self, files: list[Path], chunk: int = CHUNK, use_cache: bool = True, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not isinstance(chunk, int) or chunk < 1:   # refused here, not in the child (pack.sha256 refuses it too)
            raise ValueError(f"chunk {chunk!r}: must be a positive number of bytes")
        self.files = [Path(f).absolute() for f in files]  # absolute once: the writer compares them to its own
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):  # the result (and the lineage) is keyed by file name
            raise ValueError(f"files with the same name: {sorted({n for n in names if names.count(n) > 1})}")
        # the files opened, and their states then, before any is read (pack.stio.SourceFiles.check_unchanged
        # compares them with the files the run quantized); with the cache, the hashes it holds for those states
        self._fds, self._states = hashcache.open_files(self.files)
        self._close_fds = weakref.finalize(self, _close_all, list(self._fds.values()))  # if close() is never called
        self._known = hashcache.lookup(self._states) if use_cache else {}
        self.use_cache = use_cache
        self.cached = len(self._known)
        todo = [f for f in self.files if f not in self._known]
        script = Path(__file__).with_name("sha256.py")
        self._procs = []
        for share in _shares(todo, self._states, workers):
            args = [a for f in share if f in self._fds for a in ("--fd", str(self._fds[f]), str(f))]
            args += [str(f) for f in share if f not in self._fds]
            self._procs.append(subprocess.Popen(
                [sys.executable, "-I", "-S", str(script), "--chunk", str(chunk), *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                pass_fds=[self._fds[f] for f in share if f in self._fds]))
        self._output: list[tuple[str, str]] | None = None  # each child's (stdout, stderr) once all have exited
        self._cancelled = False
        self._stored = False

    def _wait(self) -> list[tuple[str, str]]:
        if self._output is None:
            self._output = [p.communicate() for p in self._procs]
        return self._output

    def result(self) -> dict[str, str]:
        """``{file name: sha256 hex}`` in the order of ``files``; raises OSError with a child's message if it
        could not read a file, or RuntimeError if it was cancelled."""
        outputs = self._wait()
        if self._cancelled:
            raise RuntimeError("input hashing was cancelled")
        by_name = {}
        for p, (out, err) in zip(self._procs, outputs):
            if p.returncode != 0:
                raise OSError(f"hashing the input failed: {err.strip() or f'exit status {p.returncode}'}")
            by_name.update(json.loads(out))
        fresh = {f: by_name[f.name] for f in self.files if f not in self._known}
        if self.use_cache and self._states and not self._stored:  # once: result() may be asked again
            hashcache.store(self._states, fresh)
            self._stored = True
        return {f.name: self._known[f] if f in self._known else fresh[f] for f in self.files}

    @property
    def states(self) -> dict:
        """``{file: pack.hashcache.FileState}`` of the files as they were when this hasher opened them (those it
        could open): every hash it returns, from the cache or the child, is of a file that was in that state then."""
        return dict(self._states)

    @property
    def fds(self) -> dict[Path, int]:
        """``{file: descriptor}`` of the files this hasher opened (those it could), open until :meth:`close`:
        read the files through these to read what the hashes are of (``pread``: never move their offsets)."""
        return dict(self._fds)

    def cancel(self) -> None:
        """Stop the children that still run (harmless once they have finished: :meth:`result` still answers)."""
        for p in self._procs:
            if p.poll() is None:
                self._cancelled = True
                p.kill()
        self._wait()

    def close(self) -> None:
        """:meth:`cancel`, then close the files (:meth:`result` still answers; :attr:`fds` is then empty)."""
        try:
            self.cancel()
        finally:
            self._fds.clear()
            self._close_fds()   # once: a second call does nothing


def parallel_hash_workers(files: int) -> int:
    """Children for a :class:`FileHasher` of ``files`` files whose caller has nothing else for the cores to do
    meanwhile (prune and distill, hashing a model while it loads): one per file, up to this process's cores shared
    among the node's ranks (torchrun's ``LOCAL_WORLD_SIZE``), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(files, cores // local, 8))


def _shares(files: list[Path], states: dict, workers: int) -> list[list[Path]]:
    """``files`` split into at most ``workers`` non-empty shares of about equal bytes (largest file first, each to
    the lightest share; sizes from ``states``, a file without one counted as empty), each in ``files``' order."""
    size = {f: getattr(states.get(f), "size", 0) for f in files}
    shares = [[] for _ in range(min(workers, len(files)))]
    load = [0] * len(shares)
    for f in sorted(files, key=lambda f: -size[f]):   # (sorted is stable: equal sizes keep their order)
        i = load.index(min(load))
        shares[i].append(f)
        load[i] += size[f]
    order = {f: i for i, f in enumerate(files)}
    return [sorted(s, key=order.__getitem__) for s in shares]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_lineage(ckpt: str | os.PathLike) -> list[dict]:
    """The lineage steps recorded in checkpoint dir ``ckpt`` (``pdqkit_lineage.json`` or ``quant_recipe.json``)."""
    ckpt = Path(ckpt)
    for name in (LINEAGE_FILE, RECIPE_FILE):
        f = ckpt / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e}); delete or fix the file") from None
            steps = data.get("source_lineage", []) if isinstance(data, dict) else None
            if not isinstance(steps, list) or not all(isinstance(s, dict) and "id" in s for s in steps):
                raise ValueError(f"{f}: not a lineage file (expected {{\"source_lineage\": [{{\"id\": ...}}, ...]}}); "
                                 f"delete or fix the file")
            return list(steps)
    return []


def lineage_step(kind: str, **fields) -> dict:
    """One lineage step (spec §6): ``kind`` in base/prune/distill/finetune/merge/quant; ``from`` is filled in by
    :func:`write_lineage` from the previous step when absent."""
    if kind not in {"base", "prune", "distill", "finetune", "merge", "quant"}:
        raise ValueError(f"unknown lineage kind {kind!r}")
    return {"id": fields.pop("id", kind), "kind": kind, **fields}


def base_step(ckpt: Path, files_sha256: dict[str, str]) -> dict:
    """The ``base`` lineage step of an input that carries no lineage (spec §6: every other step names its
    ``from``): a Hugging Face hub snapshot (``.../models--ORG--NAME/snapshots/REV``) by hub id and revision, any
    other checkpoint by its directory name; with the input files' sha256."""
    parts = ckpt.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        model, revision = parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    else:
        model, revision = ckpt.name, None
    return lineage_step("base", model=model, revision=revision, files_sha256=files_sha256)


def write_lineage(dst: str | os.PathLike, previous: list[dict], step: dict | None) -> list[dict]:
    """Write ``pdqkit_lineage.json`` = previous steps + ``step`` into ``dst``; returns the list written."""
    steps = [dict(s) for s in previous]
    if step is not None:
        step = dict(step)
        ids = {s.get("id") for s in steps}
        base_id, n = step["id"], 1
        while step["id"] in ids:  # keep ids unique when a stage runs twice (distill phase 1 then 2)
            n += 1
            step["id"] = f"{base_id}{n}"
        if steps and "from" not in step:
            step["from"] = steps[-1]["id"]
        steps.append(step)
    json_dump({"schema": LINEAGE_SCHEMA, "source_lineage": steps}, Path(dst) / LINEAGE_FILE)
    return steps


def _text_config(config):
    return getattr(config, "text_config", None) or config


def kv_shared_k_norm_tensors(model) -> dict:
    """``{name: ones(head_dim) bf16}`` for the KV-shared layers' ``self_attn.k_norm.weight`` that vLLM 0.26.0
    requires in unquantized Gemma-4 checkpoints (transformers builds no k_norm there). Empty for other models."""
    import torch

    cfg = _text_config(model.config)
    n_shared = getattr(cfg, "num_kv_shared_layers", 0) or 0
    if getattr(cfg, "model_type", "") not in ("gemma4_text", "gemma4") or n_shared <= 0:
        return {}
    # the decoder-layer prefix the checkpoint uses ("model.layers." or "model.language_model.layers."), and each
    # shared layer's head_dim, read off its q_norm (q and k share the head dim; per-layer in Gemma-4)
    params = dict(model.named_parameters())
    prefix = next((k[: -len("0.self_attn.q_proj.weight")] for k in params
                   if k.endswith("layers.0.self_attn.q_proj.weight")), None)
    if prefix is None:
        return {}
    n = cfg.num_hidden_layers
    extra = {}
    for i in range(n - n_shared, n):
        head_dim = params[f"{prefix}{i}.self_attn.q_norm.weight"].shape[0]
        extra[f"{prefix}{i}.self_attn.k_norm.weight"] = torch.ones(head_dim, dtype=torch.bfloat16)
    return extra


def save_bf16_checkpoint(model, out: str | os.PathLike, *, source_dir=None, step: dict | None = None,
                         tokenizer=None, force: bool = False, max_shard_size: str = "5GB",
                         fsync: bool = False, source_files_sha256: dict[str, str] | None = None) -> Path:
    """Save ``model`` (cast to bf16) as an HF safetensors checkpoint at ``out``, atomically.

    Adds the KV-shared ``k_norm`` tensors vLLM needs, copies tokenizer/processor files from ``source_dir``
    (or saves ``tokenizer``), and writes ``pdqkit_lineage.json`` = lineage of ``source_dir`` + ``step``; a
    ``source_dir`` without a lineage (a hub snapshot, any plain checkpoint) first gets its :func:`base_step`, with
    ``source_files_sha256`` (its weight files' sha256), as ``pack.quantize`` gives it, so that the model a chain
    started from stays named. ``fsync``: durable output (:func:`atomic_output_dir`'s), for the tools' final outputs.
    """
    import torch
    from safetensors import SafetensorError

    with atomic_output_dir(out, force=force, fsync=fsync) as tmp:
        try:
            _save_bf16(model.to(torch.bfloat16), tmp, max_shard_size)
        except SafetensorError as e:  # safetensors reports its I/O errors (disk full) as its own type: make them
            # the OSError that every CLI prints as one line (atomic_output_dir removes the partial output)
            raise OSError(f"{out}: writing the checkpoint failed: {e}; free disk space or choose another "
                          f"output directory") from None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_aux_files(source_dir, tmp)
        previous = read_lineage(source_dir) if source_dir else []
        if source_dir and not previous and source_files_sha256 is not None:
            previous = [base_step(Path(source_dir).resolve(), source_files_sha256)]
        write_lineage(tmp, previous, step)
        usual_file_modes(tmp)
    return Path(out)


def _umask() -> int:
    try:   # Linux >= 4.7 tells it; elsewhere set and put back at once (another thread's file could see 022)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_file_modes(folder: Path) -> None:
    """Give every file in ``folder`` the mode a plain ``open`` would (0666 less the umask, usually 0644): safetensors
    0.8's ``save_file`` writes 0600, which a server running as another user (vLLM) cannot read."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).iterdir():
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            f.chmod(mode)


def _save_bf16(model, tmp: Path, max_shard_size: str) -> None:
    """``save_pretrained`` into ``tmp`` plus the KV-shared ``k_norm`` tensors (see :func:`save_bf16_checkpoint`)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    extra = kv_shared_k_norm_tensors(model)
    if extra:
        index_f = tmp / INDEX_NAME
        if index_f.exists():  # sharded: put the norms in a shard of their own and index them
            index = json.loads(index_f.read_text())
            save_file(extra, tmp / KNORM_SHARD, metadata={"format": "pt"})
            index["weight_map"].update({k: KNORM_SHARD for k in extra})
            meta = index.setdefault("metadata", {})
            meta["total_size"] = meta.get("total_size", 0) + sum(t.numel() * t.element_size() for t in extra.values())
            json_dump(index, index_f)
        else:
            f = tmp / SINGLE_NAME
            tensors = load_file(f)
            tensors.update(extra)
            save_file(tensors, f, metadata={"format": "pt"})
