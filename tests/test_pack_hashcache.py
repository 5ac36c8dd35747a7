"""The input-hash cache (pack.hashcache) behind pack.checkpoint.FileHasher: an unchanged file's sha256 is taken
from the cache, a changed, replaced, fresh or still-changing file is hashed again, and a run's output is the same
bytes with the cache, without it and from it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import pack.hashcache as hc
from pack.checkpoint import FileHasher


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "hashes"
    monkeypatch.setenv("PDQKIT_HASH_CACHE", str(d))
    return d


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (the real guard wants their last change 2 s before the lookup)."""
    monkeypatch.setattr(hc, "SETTLE_NS", 0)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


def _shards(d: Path, n: int = 2, size: int = 3 << 20) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = d / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.write_bytes(os.urandom(size))
        files.append(f)
    return files


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _rewrite_same_size_and_mtime(f: Path) -> None:
    """New bytes, same size, the old mtime put back: only the ctime (never settable) tells the change. Written
    again until the ctime has moved (a filesystem with coarse timestamps needs a later tick)."""
    st = f.stat()
    for _ in range(40):
        time.sleep(0.05)
        f.write_bytes(os.urandom(st.st_size))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        if f.stat().st_ctime_ns != st.st_ctime_ns:
            return
    raise AssertionError(f"{f}: its ctime did not move in 2 s")


def _cached(files: list[Path]) -> int:
    """How many of ``files`` a new FileHasher finds in the cache (its child, if any, stopped)."""
    h = FileHasher(files)
    h.cancel()
    return h.cached


def test_second_run_takes_the_cache_and_starts_no_child(tmp_path, cache, settled):
    files = _shards(tmp_path / "ckpt")
    want = {f.name: _sha(f) for f in files}
    first = FileHasher(files, chunk=1 << 20)
    assert first.cached == 0 and first.result() == want
    assert len(_entries(cache)) == 2
    second = FileHasher(files)
    assert second.cached == 2 and second._procs == []  # nothing left to hash: no process started
    assert second.result() == want and list(second.result()) == [f.name for f in files]  # the files' order
    second.cancel()  # harmless without a child


def test_changed_or_replaced_files_are_hashed_again(tmp_path, cache, settled):
    a, b = _shards(tmp_path / "ckpt")
    FileHasher([a, b]).result()
    _rewrite_same_size_and_mtime(a)
    replacement = tmp_path / "new.bin"  # a fresh download renamed onto b: another inode
    replacement.write_bytes(os.urandom(b.stat().st_size))
    os.replace(replacement, b)
    h = FileHasher([a, b])
    assert h.cached == 0
    assert h.result() == {a.name: _sha(a), b.name: _sha(b)}
    again = FileHasher([a, b])
    assert again.cached == 2 and again.result() == h.result()


def test_a_fresh_file_is_hashed_but_not_stored(tmp_path, cache):
    """The real guard: a file changed less than SETTLE_NS before the lookup may still be being written."""
    files = _shards(tmp_path / "ckpt", n=1)
    assert FileHasher(files).result() == {files[0].name: _sha(files[0])}
    assert _entries(cache) == []
    assert _cached(files) == 0


def test_the_settle_guard_boundary():
    state = hc.FileState("/x", 1, 2, 3, mtime_ns=10, ctime_ns=10, seen_ns=10 + hc.SETTLE_NS)
    assert state.settled()
    assert not hc.FileState("/x", 1, 2, 3, mtime_ns=10, ctime_ns=11, seen_ns=10 + hc.SETTLE_NS).settled()
    assert state.key() == hc.FileState("/x", 1, 2, 3, 10, 10, seen_ns=0).key()  # when it was asked: not the key
    for other in (dict(path="/y"), dict(dev=9), dict(ino=9), dict(size=9), dict(mtime_ns=9), dict(ctime_ns=9)):
        fields = {**dict(path="/x", dev=1, ino=2, size=3, mtime_ns=10, ctime_ns=10, seen_ns=0), **other}
        assert hc.FileState(**fields).key() != state.key(), other


def test_files_with_the_same_name_are_refused(tmp_path, cache, settled):
    """The result, like the lineage, is keyed by file name: two files of one name would share a hash."""
    (a, ) = _shards(tmp_path / "a", n=1)
    (b, ) = _shards(tmp_path / "b", n=1)
    with pytest.raises(ValueError, match="same name"):
        FileHasher([a, b])
    assert _entries(cache) == []


def test_a_file_changed_while_hashed_is_not_stored(tmp_path, cache, settled):
    (f, ) = _shards(tmp_path / "ckpt", n=1)
    digest = _sha(f)
    states = {f: hc.file_state(f)}
    assert hc.lookup(states) == {}
    _rewrite_same_size_and_mtime(f)  # between the lookup and the store
    assert hc.store(states, {f: digest}) == 0 and _entries(cache) == []
    assert hc.store({f: hc.file_state(f)}, {f: _sha(f)}) == 1


def test_bad_entries_are_ignored(tmp_path, cache, settled):
    (f, ) = _shards(tmp_path / "ckpt", n=1)
    digest = _sha(f)
    FileHasher([f]).result()
    (entry, ) = _entries(cache)
    good = json.loads(entry.read_text())
    for bad in ("not json", json.dumps([1, 2]), json.dumps({**good, "sha256": "f" * 63}),
                json.dumps({**good, "sha256": digest.upper()}), json.dumps({**good, "size": good["size"] + 1}),
                json.dumps({**good, "format": hc.HASH_FORMAT + 1}), json.dumps({**good, "key": "0" * 64}), json.dumps({**good, "path": "/elsewhere"}),
                json.dumps({k: v for k, v in good.items() if k != "key"})):
        entry.write_text(bad)
        h = FileHasher([f])
        assert h.cached == 0 and h.result() == {f.name: digest}, bad
        entry.write_text(bad)  # the run above stored a good entry again; keep testing the bad one
    entry.write_text(json.dumps(good))
    assert _cached([f]) == 1


def test_an_entry_under_another_files_key_is_not_trusted(tmp_path, cache, settled):
    """Two files of one size: each one's entry copied over the other's name (a cache folder merged or restored
    by hand) is not taken for it, though format, size and digest are well-formed: the entry names its key."""
    files = _shards(tmp_path / "ckpt")   # same size
    want = {f.name: _sha(f) for f in files}
    assert FileHasher(files).result() == want
    a, b = _entries(cache)
    text_a, text_b = a.read_text(), b.read_text()
    a.write_text(text_b)
    b.write_text(text_a)
    h = FileHasher(files)
    assert h.cached == 0 and h.result() == want
    assert _cached(files) == 2   # stored again, under the right names


def test_a_symlinked_file_shares_its_target_entry(tmp_path, cache, settled):
    """The Hugging Face hub cache links snapshot files to blobs: the entry is the real file's."""
    (blob, ) = _shards(tmp_path / "blobs", n=1)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    link = snap / "model.safetensors"
    link.symlink_to(blob)
    assert FileHasher([blob]).result() == {blob.name: _sha(blob)}
    h = FileHasher([link])
    assert h.cached == 1 and h.result() == {"model.safetensors": _sha(blob)}


def test_no_cache_reads_and_stores_nothing(tmp_path, cache, settled):
    files = _shards(tmp_path / "ckpt", n=1)
    FileHasher(files).result()
    entries = {e: e.read_bytes() for e in _entries(cache)}
    os.utime(_entries(cache)[0], (1e9, 1e9))
    h = FileHasher(files, use_cache=False)
    assert h.cached == 0 and len(h._procs) == 1 and h.result() == {files[0].name: _sha(files[0])}
    assert {e: e.read_bytes() for e in _entries(cache)} == entries
    assert _entries(cache)[0].stat().st_mtime == 1e9  # not even marked used


def test_a_cache_that_cannot_be_used_costs_only_the_speedup(tmp_path, monkeypatch, settled):
    files = _shards(tmp_path / "ckpt", n=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PDQKIT_HASH_CACHE", str(blocker / "hashes"))  # below a file: neither readable nor writable
    for _ in range(2):
        h = FileHasher(files)
        assert h.cached == 0 and h.result() == {files[0].name: _sha(files[0])}


def test_a_missing_file_is_still_reported_by_the_child(tmp_path, cache, settled):
    good, gone = _shards(tmp_path / "ckpt")
    FileHasher([good]).result()
    gone.unlink()
    h = FileHasher([good, gone])
    assert h.cached == 1
    with pytest.raises(OSError, match=r"hashing the input failed: .*model-00002-of-00002\.safetensors: cannot read"):
        h.result()


def test_store_keeps_the_most_recently_used_entries(tmp_path, cache, settled, monkeypatch):
    monkeypatch.setattr(hc, "MAX_ENTRIES", 2)
    files = _shards(tmp_path / "ckpt", n=3, size=1024)
    for f in files:
        FileHasher([f]).result()
        time.sleep(0.01)
    assert len(_entries(cache)) == 2
    assert _cached([files[0]]) == 0  # the least recently used went first
    assert _cached(files[1:]) == 2


def test_cli_runs_write_the_same_bytes_with_without_and_from_the_cache(tmp_path, cache, settled, capsys):
    """Two runs on one checkpoint: the second takes the input hashes from the cache and writes the same files,
    lineage hashes included, as a run that hashes everything."""
    from pack.quantize import main
    from bench.factory import save_random_checkpoint

    src = save_random_checkpoint("micro", tmp_path / "src", vocab_size=4096)
    time.sleep(0.05)
    lines = {}
    for name, extra in (("ref", ["--no-hash-cache"]), ("cold", []), ("warm", [])):
        assert main([str(src), "-o", str(tmp_path / name), "--no-progress", *extra]) == 0
        lines[name] = capsys.readouterr().out.strip().splitlines()[-1]
    n = len(list(src.glob("*.safetensors")))
    assert f"0 of {n} input hashes cached" in lines["ref"] and f"0 of {n} input hashes cached" in lines["cold"]
    assert f"{n} of {n} input hashes cached" in lines["warm"]
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    for d in ("cold", "warm"):
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == names
        for name in names:
            assert (tmp_path / d / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (d, name)
    lineage = json.loads((tmp_path / "warm" / "quant_recipe.json").read_text())["source_lineage"][-1]
    assert lineage["input_sha256"] == {f.name: _sha(f) for f in sorted(src.glob("*.safetensors"))}
    shutil.rmtree(src)


def test_workers_share_the_files_among_children(tmp_path, cache, settled):
    """``workers``: the files to hash are shared among that many children (each file once, by size), and the
    result is the same; a file one child cannot read is reported as with one child."""
    from pack.checkpoint import _shares

    files = [tmp_path / f"f{i}.safetensors" for i in range(5)]
    sizes = [5, 1, 4, 2, 3]
    for f, mib in zip(files, sizes):
        f.write_bytes(os.urandom(mib << 20))
    want = {f.name: _sha(f) for f in files}
    h = FileHasher(files, use_cache=False, workers=3)
    assert len(h._procs) == 3 and h.result() == want
    h.close()
    states = hc.open_files(files)
    try:
        shares = _shares(files, states[1], 3)
    finally:
        for fd in states[0].values():
            os.close(fd)
    assert sorted(f for s in shares for f in s) == sorted(files)   # each file in exactly one share
    assert all(s == sorted(s, key=files.index) for s in shares)    # in the files' order
    loads = sorted(sum(sizes[files.index(f)] for f in s) for s in shares)
    assert loads == [5, 5, 5]   # 5 | 4 + 1 | 3 + 2: largest first, each to the lightest share
    assert _shares(files[:2], states[1], 8) == [[files[0]], [files[1]]]   # never more children than files
    with pytest.raises(ValueError, match="workers must be >= 1"):
        FileHasher(files, workers=0)
    gone = tmp_path / "gone.safetensors"
    h = FileHasher([*files, gone], use_cache=False, workers=2)
    with pytest.raises(OSError, match=r"hashing the input failed: .*gone\.safetensors: cannot read"):
        h.result()
    h.close()
