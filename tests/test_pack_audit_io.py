"""Mutation audit of pack's I/O and cache plumbing (pack.cachedir, pack.hashcache, pack.plancache, pack.checkpoint's
atomic output, sync, mode and worker helpers, pack.sha256, pack.gcpause): each test pins a guard, comparison or
constant that no other test would notice being changed or dropped. Every expectation comes from an independent
computation (hashlib, os.stat, the filesystem) or from the documented contract (docstrings, pack/README.md).
Caches point at ``tmp_path`` (conftest's autouse fixture and the ``env`` fixture here): nothing touches ~/.cache."""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

import pack.cachedir as cachedir
import pack.checkpoint as ck
import pack.hashcache as hc
import pack.plancache as pc
import pack.sha256 as sh
from pack.gcpause import gc_paused


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mode(p: Path) -> int:
    return os.lstat(p).st_mode & 0o777


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def umask():
    """Set a umask for the test (returns a setter); the process's own is put back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No cache variable set and a home directory of the test's own: what the defaults resolve to is visible."""
    for var in ("PDQKIT_CACHE", "PDQKIT_HASH_CACHE", "PDQKIT_PLAN_CACHE"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    return home


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (the real guard wants their last change SETTLE_NS before the lookup)."""
    monkeypatch.setattr(hc, "SETTLE_NS", 0)


# --- pack.cachedir: where the caches live ------------------------------------------------------------------------


def test_cache_folders_resolve_as_documented(tmp_path, monkeypatch, env):
    """README / module docs: ``$PDQKIT_HASH_CACHE`` else ``$PDQKIT_CACHE/hashes``, ``$PDQKIT_PLAN_CACHE`` else
    ``$PDQKIT_CACHE/plans``, ``$PDQKIT_CACHE`` defaulting to ``~/.cache/pdqkit``; an empty variable counts as unset.
    Protects the folder names, the variable names and the ``or`` fallbacks (a changed name would strand every
    user's cache, or write into a folder no one set)."""
    assert cachedir.cache_root() == env / ".cache" / "pdqkit"
    assert hc.hash_cache_dir() == env / ".cache" / "pdqkit" / "hashes"
    assert pc.plan_cache_dir() == env / ".cache" / "pdqkit" / "plans"
    root = tmp_path / "root"
    monkeypatch.setenv("PDQKIT_CACHE", str(root))
    assert (hc.hash_cache_dir(), pc.plan_cache_dir()) == (root / "hashes", root / "plans")
    monkeypatch.setenv("PDQKIT_HASH_CACHE", "")
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", "")
    assert (hc.hash_cache_dir(), pc.plan_cache_dir()) == (root / "hashes", root / "plans")
    monkeypatch.setenv("PDQKIT_HASH_CACHE", str(tmp_path / "h"))
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", str(tmp_path / "p"))
    assert (hc.hash_cache_dir(), pc.plan_cache_dir()) == (tmp_path / "h", tmp_path / "p")
    monkeypatch.setenv("PDQKIT_CACHE", "")
    monkeypatch.delenv("PDQKIT_HASH_CACHE")
    assert hc.hash_cache_dir() == env / ".cache" / "pdqkit" / "hashes"


def test_a_hasher_stores_under_pdqkit_cache_hashes(tmp_path, monkeypatch, env, settled):
    """End to end: with only ``$PDQKIT_CACHE`` set, a FileHasher's entry lands in ``$PDQKIT_CACHE/hashes`` under the
    key of the file's state, and nothing is written under the home directory."""
    root = tmp_path / "root"
    monkeypatch.setenv("PDQKIT_CACHE", str(root))
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(4096))
    assert ck.FileHasher([f]).result() == {f.name: _sha(f.read_bytes())}
    assert [p.name for p in (root / "hashes").iterdir()] == [f"{hc.file_state(f).key()}.json"]
    assert not env.exists()


def test_no_home_directory_leaves_the_hash_cache_alone(tmp_path, monkeypatch, env, settled):
    """hashcache.lookup and store "never raise": with no cache variable and no home directory (Path.home raises
    RuntimeError) they find nothing and store nothing. Protects their ``except RuntimeError``."""
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    f = tmp_path / "w.bin"
    f.write_bytes(b"w" * 100)
    states = {f: hc.file_state(f)}
    assert hc.lookup(states) == {}
    assert hc.store(states, {f: _sha(f.read_bytes())}) == 0


# --- pack.cachedir: entries -------------------------------------------------------------------------------------


def test_store_entry_is_readable_by_others_and_leaves_nothing_half_written(tmp_path, umask):
    """An entry is written 0644 whatever the umask (mkstemp's 0600 would hide a shared cache's entries), and a
    value JSON cannot hold is not stored: False, no temp file left, the previous entry untouched."""
    umask(0o077)
    path = tmp_path / "c" / ("ab" * 32 + ".json")
    assert cachedir.store_entry(path, {"v": 1}, "plans") is True
    assert _mode(path) == 0o644
    assert cachedir.read_entry(path) == {"v": 1, "key": path.stem, "cache": "plans"} == json.loads(path.read_text())
    before = path.read_bytes()
    assert cachedir.store_entry(path, {"v": {1, 2}}, "plans") is False   # a set: json.dump raises TypeError half-way
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name] and path.read_bytes() == before


def test_read_entry_trusts_only_an_object_naming_its_own_key(tmp_path):
    """read_entry: None for a missing file, a folder, a JSON non-object, or an object whose ``key`` is not the file
    name's stem; the object otherwise."""
    key = "c" * 64
    path = tmp_path / f"{key}.json"
    assert cachedir.read_entry(path) is None
    for text in ("[1]", json.dumps(key), json.dumps({"key": "d" * 64}), json.dumps({"v": 1})):
        path.write_text(text)
        assert cachedir.read_entry(path) is None, text
    path.write_text(json.dumps({"key": key, "v": 1}))
    assert cachedir.read_entry(path) == {"key": key, "v": 1}
    path.unlink()
    path.mkdir()
    assert cachedir.read_entry(path) is None


def test_prune_ranks_by_mtime_and_deletes_only_entries_and_stale_temps(tmp_path):
    """prune keeps the most recently *used* entries, use being the mtime (mark_used): an entry read often (recent
    atime) but not used is not kept for it. Only ``<64 hex>.json`` names are entries (full match: near misses are
    someone else's files), only ``.<64 hex>.<x>.tmp`` "over an hour old" (pack/README.md) are dead temps."""
    cache = tmp_path / "c"
    cache.mkdir()
    now = time.time()
    old_used_recently_read = cache / ("a" * 64 + ".json")
    new_used = cache / ("b" * 64 + ".json")
    for f, atime, mtime in ((old_used_recently_read, now, now - 500), (new_used, now - 900, now - 100)):
        f.write_text("{}")
        os.utime(f, (atime, mtime))
    cachedir.prune(cache, 1, "plans")
    assert sorted(p.name for p in cache.iterdir()) == [new_used.name]
    others = ["A" * 64 + ".json", "a" * 63 + ".json", "a" * 64 + ".json.bak", "x" + "a" * 64 + ".json",
              "a" * 64 + ".jsonx", "." + "a" * 64 + ".json"]
    stale = "." + "d" * 64 + ".old.tmp"
    young = "." + "d" * 64 + ".young.tmp"
    for name, age in ([(n, 10 * 3600) for n in others]
                      + [(stale, 3600 + 120), (young, 3600 - 120)]):
        (cache / name).write_text("x")
        os.utime(cache / name, (now - age, now - age))
    cachedir.prune(cache, 0, "plans")
    assert sorted(p.name for p in cache.iterdir()) == sorted([*others, young])
    cachedir.prune(tmp_path / "missing", 0, "plans")   # best effort: no folder, no error


def test_two_caches_in_one_folder_prune_only_their_own_entries(tmp_path):
    """Both cache variables pointed at one folder: each cache's pruning keeps its own ``max_entries`` most recently
    used and never deletes the other's (plan pruning at 256 used to delete input-hash entries, and the reverse);
    entries that name no cache (damaged, or from before entries named theirs) are pruned as before."""
    cache = tmp_path / "shared"
    now = time.time()
    names = {}
    for i, kind in enumerate(["plans", "hashes"] * 3):   # ages interleaved: 6 entries, the oldest first
        path = cache / (f"{i:x}" * 64 + ".json")
        assert cachedir.store_entry(path, {"i": i}, kind)
        os.utime(path, (now, now - 1000 + i))
        names.setdefault(kind, []).append(path.name)
    legacy = cache / ("f" * 64 + ".json")
    legacy.write_text(json.dumps({"key": "f" * 64}))
    os.utime(legacy, (now, now - 2000))
    cachedir.prune(cache, 2, "plans")   # 7 entries, over 2: the oldest plan and the nameless one go
    assert sorted(p.name for p in cache.iterdir()) == sorted(names["plans"][1:] + names["hashes"])
    cachedir.prune(cache, 3, "hashes")  # 5 entries, but only 3 are the hash cache's: nothing to delete
    assert sorted(p.name for p in cache.iterdir()) == sorted(names["plans"][1:] + names["hashes"])
    cachedir.prune(cache, 1, "hashes")
    assert sorted(p.name for p in cache.iterdir()) == sorted(names["plans"][1:] + names["hashes"][2:])


def test_the_plan_and_hash_caches_share_a_folder_without_evicting_each_other(tmp_path, monkeypatch, settled):
    """Through the real callers, both variables on one folder and each cache limited to one entry: storing a plan
    keeps the input hash stored before it (the plan cache's pruning used to take the older entry, whoever's it
    was), and a second input hash replaces the first but leaves the plan."""
    import pack.targets as targets
    from pack.qconfig import QuantRecipe

    shared = tmp_path / "shared"
    monkeypatch.setenv("PDQKIT_PLAN_CACHE", str(shared))
    monkeypatch.setenv("PDQKIT_HASH_CACHE", str(shared))
    monkeypatch.setattr(pc, "MAX_ENTRIES", 1)
    monkeypatch.setattr(hc, "MAX_ENTRIES", 1)
    entry = _plan_entry()
    monkeypatch.setattr(targets, "plan_model", lambda ckpt, recipe, cfg: pc._from_json(entry, cfg))
    files = []
    for i in range(2):
        files.append(tmp_path / f"w{i}.bin")
        files[-1].write_bytes(os.urandom(100))
    states = {f: hc.file_state(f) for f in files}
    digests = {f: _sha(f.read_bytes()) for f in files}
    assert hc.store({files[0]: states[files[0]]}, {files[0]: digests[files[0]]}) == 1
    first = shared / f"{states[files[0]].key()}.json"
    os.utime(first, (time.time() - 60, time.time() - 60))   # the older entry: the one a shared pruning took
    cfg = {"model_type": "gemma4"}
    assert pc.cached_plan(tmp_path, QuantRecipe(), config=cfg)[1] is False
    assert hc.lookup({files[0]: states[files[0]]}) == {files[0]: digests[files[0]]}
    os.utime(first, (time.time() - 60, time.time() - 60))   # used before the second hash is stored
    assert hc.store({files[1]: states[files[1]]}, {files[1]: digests[files[1]]}) == 1
    assert hc.lookup(states) == {files[1]: digests[files[1]]}
    assert pc.cached_plan(tmp_path, QuantRecipe(), config=cfg)[1] is True
    assert len(list(shared.iterdir())) == 2


def test_a_lookup_hit_marks_the_entry_used(tmp_path, settled):
    """hashcache.lookup marks the entries it serves used (their mtime), so pruning keeps them over unused ones
    (module doc: the MAX_ENTRIES most recently used are kept)."""
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1000))
    states = {f: hc.file_state(f)}
    assert hc.store(states, {f: _sha(f.read_bytes())}) == 1
    entry = hc.hash_cache_dir() / f"{states[f].key()}.json"
    os.utime(entry, (1e9, 1e9))
    t0 = time.time()
    assert hc.lookup(states) == {f: _sha(f.read_bytes())}
    assert entry.stat().st_mtime >= t0 - 1


# --- pack.hashcache ---------------------------------------------------------------------------------------------


def test_same_file_compares_every_state_field_but_when_it_was_seen():
    """FileState.identity is "everything but seen_ns": the store-time guard (state after hashing equals the one
    before) must notice a change of any one field, and must not care when the state was taken."""
    base = dict(path="/x", dev=1, ino=2, size=3, mtime_ns=10, ctime_ns=20, seen_ns=30)
    state = hc.FileState(**base)
    assert state.same_file(hc.FileState(**{**base, "seen_ns": 99}))
    for field in ("path", "dev", "ino", "size", "mtime_ns", "ctime_ns"):
        other = hc.FileState(**{**base, field: "/y" if field == "path" else base[field] + 1})
        assert not state.same_file(other) and not other.same_file(state), field


def test_store_skips_what_it_cannot_vouch_for(tmp_path, settled):
    """hashcache.store writes only a well-formed digest of a file whose state lookup took and that still exists
    unchanged: a digest for a file it has no state of, an ill-formed digest, a file deleted since: none stored,
    nothing raised (best effort)."""
    cache = hc.hash_cache_dir()
    f, g = tmp_path / "f.bin", tmp_path / "g.bin"
    f.write_bytes(b"f" * 100)
    g.write_bytes(b"g" * 100)
    states = {f: hc.file_state(f), g: hc.file_state(g)}
    digest = _sha(f.read_bytes())
    assert hc.store({g: states[g]}, {f: digest}) == 0                  # no state of f
    for bad in (digest.upper(), digest[:-1], digest + "0", "z" * 64):
        assert hc.store(states, {f: bad}) == 0, bad
    g.unlink()
    assert hc.store(states, {g: _sha(b"g" * 100)}) == 0                # gone between lookup and store
    assert not cache.exists() or list(cache.iterdir()) == []
    assert hc.store(states, {f: digest}) == 1 and hc.lookup({f: states[f]}) == {f: digest}


def test_lookup_ignores_an_entry_whose_digest_is_not_a_string(tmp_path, settled):
    """An entry with a non-string sha256 (a damaged or foreign entry) is ignored, not raised on (lookup "never
    raises"): protects the isinstance check before the hex match."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"w" * 64)
    states = {f: hc.file_state(f)}
    assert hc.store(states, {f: _sha(f.read_bytes())}) == 1
    entry = hc.hash_cache_dir() / f"{states[f].key()}.json"
    good = json.loads(entry.read_text())
    for bad in (None, 123, ["a" * 64]):
        entry.write_text(json.dumps({**good, "sha256": bad}))
        assert hc.lookup(states) == {}, bad


def test_fd_state_describes_the_open_file_not_what_the_path_names_now(tmp_path):
    """fd_state uses fstat of the descriptor: after a rename onto the path, the state is still of the file that
    was opened (the one the hasher reads), so its key is not the new file's."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"old" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        new = tmp_path / "new.bin"
        new.write_bytes(b"new" * 200)
        os.replace(new, f)
        st = hc.fd_state(f, fd, 0)
        opened = os.fstat(fd)
    finally:
        os.close(fd)
    assert (st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns) == (
        opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns, opened.st_ctime_ns)
    assert st.ino != os.stat(f).st_ino and st.size == 300 and st.path == os.path.realpath(f)
    link = tmp_path / "link"   # a hub snapshot's link: the state names the real file (its entry is the blob's)
    link.symlink_to(f)
    fd = os.open(link, os.O_RDONLY)
    try:
        assert hc.fd_state(link, fd, 0).path == str(f.resolve()) != str(link)
    finally:
        os.close(fd)


def test_open_files_closes_what_it_opened_when_interrupted(tmp_path, monkeypatch):
    """open_files: a file that cannot be opened is left out; a stop signal half-way closes the descriptors it had
    opened (no leak of every earlier input file)."""
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    fds, found = hc.open_files([files[0], tmp_path / "missing", files[1]])
    try:
        assert list(fds) == list(found) == [files[0], files[1]]
    finally:
        for fd in fds.values():
            os.close(fd)
    real, calls = hc.fd_state, []

    def interrupted(f, fd, seen=None):
        calls.append(f)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(f, fd, seen)

    monkeypatch.setattr(hc, "fd_state", interrupted)
    before = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        hc.open_files(files)
    assert _open_fds() == before


# --- pack.checkpoint: output-path guards ------------------------------------------------------------------------


def test_check_output_dir_refuses_every_overlap_and_only_overlaps(tmp_path):
    """An output that is, contains or lies inside an input (compared resolved: ``..``, symlinks) is refused; a
    sibling, even one whose name starts with the input's, is not."""
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(src)
    for out in (src, src / "sub", src / "sub" / "deeper", tmp_path, tmp_path / "x" / ".." / "ckpt",
                tmp_path / "alias", tmp_path / "alias" / "new"):
        with pytest.raises(ValueError, match="must not be, contain or lie inside the input"):
            ck.check_output_dir(out, {"input": src})
    for out in (tmp_path / "ckpt2", tmp_path / "ckpt-w4a16", tmp_path / "other" / "ckpt"):
        ck.check_output_dir(out, {"input": src})


def test_check_writable_parent_probes_the_deepest_existing_folder_and_leaves_nothing(tmp_path):
    """The probe goes in the deepest folder that exists (no parent created), and is removed; a file in the way is a
    ValueError naming the option."""
    before = sorted(tmp_path.iterdir())
    ck.check_writable_parent(tmp_path / "a" / "b" / "out", "-o")
    ck.check_writable_parent(tmp_path / "out", "-o")
    assert sorted(tmp_path.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile" / "out", tmp_path / "afile" / "deeper" / "out"):
        with pytest.raises(ValueError, match=r"^--save .*cannot write there"):
            ck.check_writable_parent(bad, "--save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_check_replaceable_accepts_only_what_force_may_replace(tmp_path):
    """--force may replace nothing, a symlink, an empty folder, or an earlier output: a folder with a config.json
    *and* a lineage file, recipe, weights or index (a dangling link counts: lexists). A config.json alone, a marker
    alone, other files, or a file: FileExistsError."""
    markers = (ck.LINEAGE_FILE, ck.RECIPE_FILE, ck.SINGLE_NAME, ck.INDEX_NAME)   # lineage files, weights
    ok = {"missing": None, "empty": [], **{f"config+{m}": ["config.json", m] for m in markers}}
    refused = {"config only": ["config.json"], "other files": ["notes.txt", "main.py"],
               **{f"{m} only": [m] for m in markers}}
    for name, files in {**ok, **refused}.items():
        d = tmp_path / name
        if files is not None:
            d.mkdir()
            for f in files:
                (d / f).write_text("{}")
        if name in refused:
            with pytest.raises(FileExistsError, match="not a checkpoint"):
                ck.check_replaceable(d)
        else:
            ck.check_replaceable(d)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "config.json").write_text("{}")
    (dangling / ck.SINGLE_NAME).symlink_to(tmp_path / "nowhere")
    ck.check_replaceable(dangling)
    (tmp_path / "link").symlink_to(tmp_path / "other files")   # a link to a folder of other files: the link goes
    ck.check_replaceable(tmp_path / "link")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not an output directory"):
        ck.check_replaceable(tmp_path / "afile")


# --- pack.checkpoint: atomic_output_dir -------------------------------------------------------------------------


def test_atomic_output_dir_output_is_an_ordinary_directory(tmp_path, umask):
    """mkdtemp makes the temp dir 0700; the committed output is 0755 (other users, e.g. a vLLM server, can list
    it). An existing output without force is refused before anything is created."""
    umask(0o077)
    out = tmp_path / "out"
    with ck.atomic_output_dir(out) as tmp:
        assert _mode(tmp) == 0o700 and tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "f").write_text("x")
    assert _mode(out) == 0o755 and (out / "f").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="pass --force"):
        with ck.atomic_output_dir(out):
            pytest.fail("entered although the output exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_fsync_syncs_the_tree_then_every_parent_it_touched(tmp_path, monkeypatch):
    """``fsync=True``: the temp dir's whole tree before the rename (so the output's files are on disk before it
    appears), then ``out``'s parent and the parent of every directory the call created (their entries are on disk
    when it returns). ``fsync=False``: no sync at all."""
    events = []

    def tree(root):   # (the real one would sync the temp dir's own folders through fsync_dir: not listed here)
        events.append(("tree", Path(root), sorted(p.name for p in Path(root).iterdir()), out.exists()))

    monkeypatch.setattr(ck, "fsync_tree", tree)
    monkeypatch.setattr(ck, "fsync_dir", lambda d: events.append(("dir", Path(d))))
    out = tmp_path / "a" / "b" / "out"
    with ck.atomic_output_dir(out, fsync=True) as tmp:
        (tmp / "w").write_text("x")
    assert events[0] == ("tree", tmp, ["w"], False)
    assert [e[1] for e in events[1:]] == [tmp_path / "a" / "b", tmp_path / "a", tmp_path]
    events.clear()
    with ck.atomic_output_dir(tmp_path / "c" / "out2") as tmp:
        (tmp / "w").write_text("x")
    assert events == []


def test_force_over_a_symlink_to_a_directory_keeps_what_it_points_to(tmp_path):
    """--force replaces a symlink at the output with the output; the folder it pointed to, and its files, stay
    (deleting the previous copy must not follow the link)."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep me")
    link = tmp_path / "out"
    link.symlink_to(target)
    with ck.atomic_output_dir(link, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert not link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new"]
    assert (target / "data").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious"]


# --- pack.checkpoint: fsync_tree / fsync_dir ---------------------------------------------------------------------


def test_fsync_tree_syncs_files_first_then_dirs_deepest_first_and_skips_links(tmp_path, monkeypatch):
    """Every regular file's data, then every directory deepest first (a directory after its subdirectories, so an
    entry is on disk only once what it names is); symlinks are directory entries, not files to sync (a dangling
    one would not even open); a file root: its data only."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    for f in ("x", "a/y", "a/b/z"):
        (root / f).write_text(f)
    (root / "a" / "dangling").symlink_to(tmp_path / "nowhere")
    (root / "a" / "link").symlink_to(root / "x")
    events = []
    real_file, real_dir = ck._fsync_file, ck.fsync_dir
    monkeypatch.setattr(ck, "_fsync_file", lambda f: (events.append(("file", Path(f))), real_file(f)))
    monkeypatch.setattr(ck, "fsync_dir", lambda d: (events.append(("dir", Path(d))), real_dir(d)))
    ck.fsync_tree(root)
    files = [p for kind, p in events if kind == "file"]
    dirs = [p for kind, p in events if kind == "dir"]
    assert sorted(files) == sorted([root / "x", root / "a" / "y", root / "a" / "b" / "z"])
    assert events[:len(files)] == [("file", p) for p in files]   # all files before any directory
    assert sorted(dirs) == sorted([root, root / "a", root / "a" / "b"])
    assert all(dirs.index(d) < dirs.index(d.parent) for d in dirs if d != root)
    events.clear()
    ck.fsync_tree(root / "x")
    assert events == [("file", root / "x")]


@pytest.mark.parametrize("code, swallowed", [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EIO, False),
                                             (errno.ENOSPC, False)])
def test_sync_errors_that_mean_no_sync_are_skipped_and_io_errors_raised(tmp_path, monkeypatch, code, swallowed):
    """A filesystem that does not sync (EINVAL, ENOTSUP) is as durable as it makes things: no error. An I/O error
    (EIO, ENOSPC: the data did not reach the disk) is raised, by the file sync and the directory sync."""
    f = tmp_path / "f"
    f.write_text("x")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ck.os, "fsync", fail)
    monkeypatch.setattr(ck.os, "fdatasync", fail, raising=False)
    before = _open_fds()
    for call in (lambda: ck.fsync_dir(tmp_path), lambda: ck.fsync_tree(f)):
        if swallowed:
            call()
        else:
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == code
    assert _open_fds() == before   # the descriptors are closed either way


# --- pack.checkpoint: file modes and worker counts ---------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_usual_file_modes_follow_the_umask_and_never_reach_through_a_link(tmp_path, umask, mask):
    """Files get 0666 less the umask (what a plain open would give); a symlink in the folder is left alone, and so
    is the file it points to (outside the checkpoint: not ours to chmod); subfolders are not files."""
    umask(mask)
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("o")
    outside.chmod(0o600)
    (d / "sub").chmod(0o700)
    for name, mode in (("model.safetensors", 0o600), ("config.json", 0o777)):
        (d / name).write_text(name)
        (d / name).chmod(mode)
    (d / "link").symlink_to(outside)
    ck.usual_file_modes(d)
    want = 0o666 & ~mask
    assert {f.name: _mode(f) for f in d.iterdir() if not f.is_symlink() and f.is_file()} == {
        "model.safetensors": want, "config.json": want}
    assert _mode(outside) == 0o600 and _mode(d / "sub") == 0o700
    assert ck._umask() == mask and os.umask(mask) == mask   # read without changing it


def test_umask_without_proc_is_read_and_put_back(umask, monkeypatch):
    """Where /proc/self/status cannot be read, _umask sets a umask and puts the old one back at once: it returns
    the process's umask and leaves it as it was."""
    import pathlib

    def no_proc(self, *a, **k):
        raise OSError(errno.ENOENT, "no /proc")

    umask(0o027)
    monkeypatch.setattr(pathlib.Path, "read_text", no_proc)
    got = ck._umask()
    monkeypatch.undo()
    assert got == 0o027 and os.umask(0o027) == 0o027


@pytest.mark.parametrize("cores, local, files", [(16, None, 3), (16, None, 20), (16, "4", 20), (16, "4", 2),
                                                 (4, "8", 5), (2, "", 5), (64, "2", 100), (8, None, 0),
                                                 (3, "0", 10)])
def test_parallel_hash_workers(monkeypatch, cores, local, files):
    """Docstring: one child per file, up to this process's cores shared among the node's ranks
    (``LOCAL_WORLD_SIZE``, unset or empty: 1), at most 8, and always at least one."""
    monkeypatch.setattr(ck.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    ranks = max(1, int(local or 1))
    per_rank = max(1, cores // ranks)
    assert ck.parallel_hash_workers(files) == max(1, min(files, per_rank, 8))


# --- pack.checkpoint: FileHasher ---------------------------------------------------------------------------------


def test_file_hasher_stores_once_and_close_closes_its_files(tmp_path, monkeypatch, settled):
    """result() may be asked again: the fresh hashes go to the cache once. close() closes the descriptors the
    hasher opened (not only at garbage collection), and result() still answers."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(5000))
    calls = []
    real = hc.store
    monkeypatch.setattr(hc, "store", lambda *a: (calls.append(a), real(*a))[1])
    before = _open_fds()
    h = ck.FileHasher([f])
    fds = list(h.fds.values())
    assert len(fds) == 1 and os.path.samestat(os.fstat(fds[0]), f.stat())
    want = {f.name: _sha(f.read_bytes())}
    assert h.result() == want and h.result() == want
    assert len(calls) == 1
    h.close()
    assert h.fds == {} and _open_fds() == before and h.result() == want


# --- pack.sha256 ------------------------------------------------------------------------------------------------


def test_sha256_fd_hashes_the_whole_file_and_never_moves_the_offset(tmp_path):
    """A regular file is read with pread from its start, in buffer-sized blocks: the hash is of all of it, whatever
    the descriptor's offset (shared with the parent's readers), which it leaves where it was."""
    data = os.urandom(1000)
    f = tmp_path / "f"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.lseek(fd, 333, os.SEEK_SET)
        assert sh.sha256_fd(fd, bytearray(7)) == _sha(data)        # 143 blocks, the last one short
        assert sh.sha256_fd(fd, bytearray(4096)) == _sha(data)     # one block larger than the file
        assert os.lseek(fd, 0, os.SEEK_CUR) == 333
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.write(w, data[:500])
    os.close(w)
    try:
        assert sh.sha256_fd(r, bytearray(64)) == _sha(data[:500])  # a pipe: as it comes
    finally:
        os.close(r)


def test_sha256_by_descriptor_hashes_the_file_as_opened(tmp_path, capsys):
    """``(fd, path)``: the hash is of the file open as fd even once the path names another (a rename onto it), keyed
    by the path's name; the CLI's ``--chunk`` and ``--fd`` do the same."""
    f = tmp_path / "model.safetensors"
    old = os.urandom(3000)
    f.write_bytes(old)
    fd = os.open(f, os.O_RDONLY)
    try:
        new = tmp_path / "new"
        new.write_bytes(os.urandom(3000))
        os.replace(new, f)
        assert sh.sha256_files([(fd, f)], chunk=100) == {f.name: _sha(old)}
        own = sh._own_open_file(fd)   # an open file of its own (no read-ahead shared with the parent's readers)
        try:
            assert own is not None and own != fd and os.path.samestat(os.fstat(own), os.fstat(fd))
        finally:
            if own is not None:
                os.close(own)
        assert sh.sha256_files([f], chunk=100) == {f.name: _sha(f.read_bytes())}
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert sh.main(["--chunk", "64", "--fd", str(fd), str(f)]) == 0
        assert json.loads(capsys.readouterr().out) == {f.name: _sha(old)}
    finally:
        os.close(fd)
    assert sh.main(["--chunk", "64", str(tmp_path / "gone")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path / 'gone'}: cannot read it") and err.count("\n") == 1


# --- pack.gcpause -----------------------------------------------------------------------------------------------


def test_gc_paused_restores_the_state_it_found():
    """Inside: collector off. After: the state before, on or off, also after an exception; nested use keeps it off
    until the outer block ends."""
    was = gc.isenabled()
    try:
        gc.enable()
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        with pytest.raises(ZeroDivisionError):
            with gc_paused():
                1 / 0
        assert gc.isenabled()
        gc.disable()
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


# --- pack.plancache ---------------------------------------------------------------------------------------------


def _plan_entry() -> dict:
    qc = {"config_groups": {}, "format": "pack-quantized", "ignore": ["lm_head"],
          "quant_method": "compressed-tensors"}
    serving = {"max_position_embeddings": 8, "multimodal": False, "head_dim_fix": None}
    return {"format": pc.PLAN_FORMAT, "architecture": "XForCausalLM", "targeted": ["m.q"], "saved": [["m.q", [2, 4]]],
            "keep_fp32": [], "quantization_config": qc, "serving": serving, "sources": ["transformers.x"]}


def test_a_plan_entry_needs_every_documented_field():
    """_from_json: an entry of this format with every field well-typed, and the quantization_config and serving
    blocks with the keys the writer reads, is a plan; drop any one of those keys, give another format, or put a
    non-string among the names, and it is rebuilt (None)."""
    good = _plan_entry()
    plan = pc._from_json(good, {"c": 1})
    assert plan is not None and plan.saved == {"m.q": (2, 4)} and plan.config == {"c": 1}
    bad = [{**good, "format": pc.PLAN_FORMAT - 1}, {**good, "architecture": 3}, {**good, "targeted": ["a", 1]},
           {**good, "keep_fp32": [None]}, {**good, "sources": [1]}, {**good, "quantization_config": []},
           {**good, "serving": "x"}, {**good, "saved": [["m.q", ["two"]]]},
           {**good, "quantization_config": list(good["quantization_config"])},   # the keys, but not a dict
           {**good, "serving": list(good["serving"])}]
    for block in ("quantization_config", "serving"):
        for k in good[block]:
            bad.append({**good, block: {kk: v for kk, v in good[block].items() if kk != k}})
    for k in good:
        bad.append({kk: v for kk, v in good.items() if kk != k})
    for entry in bad:
        assert pc._from_json(entry, {}) is None, entry


def test_a_config_naming_other_config_files_is_planned_without_the_cache(tmp_path, monkeypatch):
    """Module doc: a config.json that lists ``configuration_files`` is planned without the cache (the key does not
    cover the versioned config transformers may read instead): planned every time, nothing stored. The same config
    without it is stored, then served."""
    import pack.targets as targets
    from pack.qconfig import QuantRecipe

    entry = _plan_entry()
    calls = []

    def plan_model(ckpt, recipe, cfg):
        calls.append(cfg)
        return pc._from_json(entry, cfg)

    monkeypatch.setattr(targets, "plan_model", plan_model)
    cache = pc.plan_cache_dir()
    cfg = {"model_type": "gemma4", "configuration_files": ["config.4.99.json"]}
    for _ in range(2):
        plan, hit = pc.cached_plan(tmp_path, QuantRecipe(), config=cfg)
        assert not hit and plan == pc._from_json(entry, cfg)
    assert len(calls) == 2 and (not cache.exists() or list(cache.iterdir()) == [])
    plain = {"model_type": "gemma4"}
    assert pc.cached_plan(tmp_path, QuantRecipe(), config=plain)[1] is False
    assert pc.cached_plan(tmp_path, QuantRecipe(), config=plain) == (pc._from_json(entry, plain), True)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("chunk", [0, -1, 1.5])
def test_a_read_size_that_reads_nothing_is_refused(tmp_path, chunk):
    """A 0-byte read buffer reads nothing: before, ``sha256_file(f, chunk=0)`` returned the hash of no bytes for
    every file (found by the forty-first session's audit; no CLI passes a chunk, callers in Python could)."""
    from pack.checkpoint import FileHasher, sha256_file

    f = tmp_path / "x"
    f.write_bytes(b"abc")
    with pytest.raises(ValueError, match="must be a positive number of bytes"):
        sha256_file(f, chunk)
    with pytest.raises(ValueError, match="must be a positive number of bytes"):
        FileHasher([f], chunk=chunk, use_cache=False)
    assert sha256_file(f, 1) == hashlib.sha256(b"abc").hexdigest()
