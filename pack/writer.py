"""Write a W4A16 compressed-tensors ``pack-quantized`` checkpoint from a bf16 HF checkpoint, streaming.

Pipeline (spec pack-quantized.md):

1. **check** config.json (:func:`pack.targets.load_config`) and the safetensors headers (:mod:`pack.stio`);
   hash the input files in a child process (:class:`pack.checkpoint.FileHasher`; the CLI starts it before
   importing torch, so the input is hashed on the second core while the first imports torch and transformers),
   all but those whose hash :mod:`pack.hashcache` holds for the file as it is (path, inode, size, times).
2. **plan** (:mod:`pack.targets`, :mod:`pack.qconfig`): the architecture built from config.json on the meta
   device says which Linears are targeted (recipe ``targets`` minus ``ignore``) and which tensors
   ``save_pretrained`` would write; the input tensors are checked against it (missing tensors, shapes, dtypes,
   K % group, already-quantized input) before anything is written. The plan is kept in :mod:`pack.plancache`
   under a key of everything it depends on: a later run on the same config, recipe and libraries reads it back
   and imports neither transformers' architecture nor compressed-tensors.
3. **lay out** the output: per targeted Linear ``<m>.weight_packed`` (I32 ``[N, K/8]``), ``<m>.weight_scale``
   (BF16 ``[N, K/g]``), ``<m>.weight_shape`` (I64 ``[2]``) in place of ``<m>.weight``; every other tensor
   unchanged; shards of at most ``max_shard_size`` bytes (default 20 GB like llmcompressor: E4B fits one file).
4. **stream** (:mod:`pack.pipeline`): each output file is written in safetensors order from pieces computed
   ahead by a thread pool: row blocks of a Linear weight observed and packed on ``device``, 4 MiB chunks of
   passthrough tensors (NaN-checked; non-bf16 floats cast to bf16 like transformers'
   ``from_pretrained(dtype=bfloat16)``); a few MB per worker in memory, never a whole model or shard.
5. **finish**: index (if sharded), tokenizer/processor files, ``pdqkit_lineage.json`` + ``quant_recipe.json``
   (spec §6), model card, ``vllm_config.yaml`` and ``config.json`` (+ ``quantization_config``, §3) last; the
   temp dir is renamed to ``out`` only when everything succeeded (:func:`pack.checkpoint.atomic_output_dir`),
   and only once every file is on disk (``fsync``, on by default: the writer starts each file's writeback as it
   streams, so the final sync waits for the tail; the rename is synced too). ``fsync=False`` (``--no-fsync``)
   skips it: the bytes are the same, only a crash soon after the run could leave unwritten blocks.

Same input and options -> byte-identical output (no timestamps unless ``SOURCE_DATE_EPOCH`` is set).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable

import torch

from . import card
from .checkpoint import (INDEX_NAME, RECIPE_FILE, SINGLE_NAME, FileHasher, atomic_output_dir, base_step,
                         check_output_dir, check_replaceable, copy_aux_files, json_dump, lineage_step, read_lineage,
                         safetensors_files, write_lineage)
from .errors import QuantizeError
from .gcpause import gc_paused
from .packing import PACK_FACTOR
from .pipeline import Piece, Quantizer, passthrough_pieces, row_blocks, stream_file
from .plancache import cached_plan
from .qconfig import EQUIVALENT_TO, QuantRecipe
from .stio import ST_DTYPES, SafetensorsFileWriter, SourceFiles, tensor_bytes
from .targets import ModelPlan, load_config, looks_quantized

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "QuantizeResult", "quantize_checkpoint", "parse_size"]

DEFAULT_MAX_SHARD_SIZE = 20 * 10**9  # llmcompressor's save_pretrained_wrapper: "20GB" (decimal)
RECIPE_SCHEMA = "quant_recipe/1"


def parse_size(s: str | int) -> int:
    """``"20GB"`` -> 20e9, ``"500MiB"`` -> 500 * 2**20, plain ints as bytes (transformers' convention)."""
    if isinstance(s, int):
        return s
    t = s.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                v = float(t[: -len(u)])
            except ValueError:
                break
            if math.isfinite(v) and v * m >= 1:
                return int(v * m)
            break
    else:
        if t.isdigit() and int(t) > 0:
            return int(t)
    raise QuantizeError(f"--max-shard-size {s!r}: give a size like 20GB, 5GB or 500MiB")


@dataclass
class QuantizeResult:
    """What a run wrote and what it cost (the CLI's closing summary)."""

    out: Path
    quantized_modules: int
    quantized_tensors: int          # 3 per module: weight_packed, weight_scale, weight_shape
    kept_tensors: int               # passthrough tensors
    dropped: list[str]              # input tensors the model does not load (e.g. KV-shared k_norm)
    cast: list[str]                 # passthrough tensors cast to bf16
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss: int
    files_sha256: dict[str, str] = field(default_factory=dict)
    stream_seconds: float = 0.0     # of which: streaming the tensors (after imports, planning, checks)
    plan_cached: bool = False       # the model plan came from pack.plancache (transformers not imported)
    hashes_cached: tuple[int, int] = (0, 0)  # (input files whose sha256 came from pack.hashcache, input files)

    @property
    def gbps(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        stream = self.bytes_in / self.stream_seconds / 1e9 if self.stream_seconds > 0 else float("inf")
        plan = "cached" if self.plan_cached else "built"
        return (f"pdqkit quantize: {self.quantized_modules} Linears quantized ({self.quantized_tensors} tensors), "
                f"{self.kept_tensors} tensors kept, {len(self.dropped)} dropped; "
                f"{self.bytes_in / 1e9:.3f} GB in -> {self.bytes_out / 1e9:.3f} GB out in {self.seconds:.2f} s "
                f"({self.gbps:.2f} GB/s; streaming {stream:.2f} GB/s; plan {plan}; "
                f"{self.hashes_cached[0]} of {self.hashes_cached[1]} input hashes cached); "
                f"peak RSS {self.peak_rss / 2**30:.2f} GiB -> {self.out}")


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class _Out:
    """One output tensor: its spec and how to produce its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: Callable[[], list[Piece]]


def _check_inputs(plan: ModelPlan, src: SourceFiles, recipe: QuantRecipe) -> tuple[list[str], list[str]]:
    """Validate the input tensors against the model; returns (dropped keys, keys that get cast to bf16)."""
    quantized = [k for k in src.tensors if looks_quantized(k)]
    if quantized:
        e = src.tensors[quantized[0]]
        raise QuantizeError(f"{e.file}: tensor {e.name} is already quantized; pass the original bf16 checkpoint")
    weights = {f"{m}.weight" for m in plan.targeted}
    tied = sorted(w for w in weights if w not in plan.saved)
    if tied:  # a tied alias (Gemma-4's lm_head = embed_tokens) has no weight of its own to quantize
        m = tied[0].removesuffix(".weight")
        raise QuantizeError(f"{src.dir}: {m} is targeted but its weight is tied to another tensor (e.g. the "
                            f"embeddings) and not stored on its own; leave it in bf16 with --extra-ignore {m}")
    _check_fused_sets(plan, src)
    scheme = recipe.observer_scheme()
    cast = []
    for key, shape in plan.saved.items():
        e = src.tensors.get(key)
        if e is None:
            raise QuantizeError(f"{src.dir}: tensor {key} is missing from the checkpoint but {plan.architecture} "
                                f"needs it (config.json does not match the weights); pass the complete checkpoint")
        if e.shape != shape:
            raise QuantizeError(f"{e.file}: tensor {key} has shape {list(e.shape)} but config.json implies "
                                f"{list(shape)}; the config does not match the weights")
        if key in weights:
            if e.dtype != "BF16":
                raise QuantizeError(
                    f"{e.file}: tensor {key} is {e.dtype}, not BF16; pdqkit quantizes bf16 checkpoints: convert "
                    f"it first (model.to(torch.bfloat16).save_pretrained(dir)), or leave it unquantized with "
                    f"--extra-ignore {_with_fused(key.removesuffix('.weight'), plan)}")
            if len(shape) != 2:
                raise QuantizeError(f"{e.file}: targeted {key} is not a 2-D Linear weight (shape {list(shape)}); "
                                    f"leave it out with --extra-ignore {key.removesuffix('.weight')}")
            module = key.removesuffix(".weight")
            try:
                scheme.check_k(shape[1], module)
            except ValueError:
                raise QuantizeError(
                    f"{e.file}: {module}: in_features K={shape[1]} is not a multiple of group_size "
                    f"{recipe.group_size} (llmcompressor refuses it too); leave it in bf16 with --extra-ignore "
                    f"{_with_fused(module, plan)} or pick a --group-size that divides K") from None
        elif e.is_float and e.dtype != "BF16" and not _keeps_fp32(plan, key):
            cast.append(key)
    dropped = sorted(set(src.tensors) - set(plan.saved))
    return dropped, cast


# Linears vLLM loads as one fused layer (qkv_proj, gate_up_proj): it refuses a checkpoint that quantizes only some
# of them ("Found a different quantization schemes", spec §4.1)
FUSED_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _with_fused(module: str, plan: ModelPlan) -> str:
    """``module`` and the Linears vLLM fuses it with (its layer's q/k/v or gate/up), space-separated: what an
    ``--extra-ignore`` that leaves it unquantized must name (:func:`_check_fused_sets` refuses one alone)."""
    parent, _, leaf = module.rpartition(".")
    modules = {k.removesuffix(".weight") for k in plan.saved if k.endswith(".weight")}
    fused = next((f for f in FUSED_SETS if leaf in f), (leaf,))
    return " ".join(m for m in (f"{parent}.{x}" for x in fused) if m == module or m in modules)


def _check_fused_sets(plan: ModelPlan, src: SourceFiles) -> None:
    targeted = set(plan.targeted)
    modules = {k.removesuffix(".weight") for k in plan.saved if k.endswith(".weight")}
    for parent, _, leaf in sorted(m.rpartition(".") for m in targeted):
        for fused in FUSED_SETS:
            if leaf not in fused:
                continue
            members = [f"{parent}.{x}" for x in fused if f"{parent}.{x}" in modules]
            left = [m for m in members if m not in targeted]
            if left:
                raise QuantizeError(
                    f"{src.dir}: {left[0]} is ignored but {parent}.{leaf} is quantized; vLLM loads "
                    f"{'/'.join(fused)} of a layer as one fused Linear and refuses mixed schemes: ignore all of "
                    f"{', '.join(m.rpartition('.')[2] for m in members)} there, or none")


def _keeps_fp32(plan: ModelPlan, key: str) -> bool:
    parts = key.split(".")
    return any(frag in parts or frag in key for frag in plan.keep_fp32)


def _plan_outputs(plan: ModelPlan, src: SourceFiles, recipe: QuantRecipe, cast: set[str],
                  quantizer: Quantizer) -> list[list[_Out]]:
    """Output tensors grouped per module (a quantized Linear's three tensors stay together), saved-key order."""
    weight_of = {f"{m}.weight": m for m in plan.targeted}
    quantizer.reserve({m: src.tensors[w] for w, m in weight_of.items()})
    groups = []
    for key in plan.saved:
        e = src.tensors[key]
        m = weight_of.get(key)
        if m is None:
            c = key in cast
            groups.append([_Out(key, "BF16" if c else e.dtype, e.shape, lambda e=e, c=c: passthrough_pieces(src, e, c))])
            continue
        n, k = e.shape
        g = k if recipe.group_size == -1 else recipe.group_size
        shape_t = torch.tensor([n, k], dtype=torch.int64)
        blocks = row_blocks(n, k, quantizer.device.type)
        groups.append([
            _Out(f"{m}.weight_packed", "I32", (n, -(-k // PACK_FACTOR)), lambda m=m, e=e, b=blocks, k=k: [
                Piece(lambda r0=r0, r1=r1: quantizer.packed(m, e, r0, r1), (r1 - r0) * k * 4) for r0, r1 in b]),
            _Out(f"{m}.weight_scale", "BF16", (n, k // g), lambda m=m, e=e, b=blocks: [
                Piece(lambda r0=r0, r1=r1: quantizer.scale(m, e, r0, r1), 0, pooled=False) for r0, r1 in b]),
            _Out(f"{m}.weight_shape", "I64", (2,), lambda t=shape_t: [Piece(lambda: tensor_bytes(t), 0, pooled=False)]),
        ])
    return groups


def _nbytes(o: _Out) -> int:
    return prod(o.shape) * ST_DTYPES[o.dtype].itemsize


def _shard(groups: list[list[_Out]], max_bytes: int) -> list[list[_Out]]:
    """Fill shards in order, never splitting a group (transformers' split_torch_state_dict_into_shards rule)."""
    shards, cur, size = [], [], 0
    for grp in groups:
        b = sum(_nbytes(o) for o in grp)
        if cur and size + b > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.extend(grp)
        size += b
    if cur or not shards:
        shards.append(cur)
    return shards


# ---------------------------------------------------------------------------------------------- provenance


def _tool_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("pdqkit")
    except PackageNotFoundError:
        ver = _pyproject_version()
    info = {"name": "pdqkit", "version": ver}
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            if sha:
                info["git"] = sha
                # the code that writes the bytes differs from that commit: say so (docs and tests do not count)
                st = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                     "pack", "pyproject.toml"], capture_output=True, text=True, timeout=10)
                if st.returncode == 0 and st.stdout.strip():
                    info["git_dirty"] = True
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _pyproject_version() -> str:
    f = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = f.read_text()
    except OSError:
        return "unknown"
    try:
        import tomllib
    except ImportError:   # Python 3.10 (pdqkit's floor) has none: the [project] table's own version line
        import re

        m = re.search(r'^\[project\]\s*$(?:(?!^\[).)*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
        return m.group(1) if m else "unknown"
    try:
        return tomllib.loads(text)["project"]["version"]
    except (KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _created() -> dict:
    """``{"created": ...}`` from SOURCE_DATE_EPOCH only: outputs stay byte-identical across runs."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return {}
    import datetime as dt

    try:
        when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise QuantizeError(f"SOURCE_DATE_EPOCH={epoch!r}: not a Unix time in seconds; unset it or give an "
                            f"integer") from None
    return {"created": when.strftime("%Y-%m-%dT%H:%M:%SZ")}


# ---------------------------------------------------------------------------------------------- the job


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantizeError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is "
                                f"False); use --device cpu (same bytes)")
        return device
    raise QuantizeError(f"--device {device!r}: use cpu or cuda")


def _workers(device: str) -> int:
    if device != "cpu":
        return 2  # the GPU computes; a second thread keeps the reads and passthrough chunks ahead of it
    return max(1, min(8, len(os.sched_getaffinity(0))))


MAX_AHEAD_BYTES = 64 << 20  # bytes in flight ahead of the writer (bounds the peak RSS)


def _write_shards(tmp: Path, shards: list[list[_Out]], workers: int, bar,
                  writeback: bool = False) -> tuple[dict, dict, int]:
    """Stream every shard file; returns ({file: sha256}, {tensor: file}, total tensor bytes). ``writeback``: start
    writing each file to disk as it is written (pack.stio.SafetensorsFileWriter)."""
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    hashes, weight_map, total = {}, {}, 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdqkit-work") as pool:
        for fname, shard in zip(names, shards):
            w = SafetensorsFileWriter(tmp / fname, {o.name: (o.dtype, o.shape) for o in shard}, writeback=writeback)
            try:
                stream_file(w, {o.name: o.pieces() for o in shard}, pool, max_inflight=4 * workers + 4,
                            max_bytes=MAX_AHEAD_BYTES, on_tensor=lambda name: bar.update(1))
                hashes[fname] = w.close()
            except BaseException:
                w.abort()
                raise
            weight_map.update({o.name: fname for o in shard})
            total += sum(_nbytes(o) for o in shard)
    return hashes, weight_map, total


def quantize_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, recipe: QuantRecipe | None = None, *,
                        device: str = "cpu", force: bool = False,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                        progress: bool = False, vllm_max_model_len: int = 8192,
                        input_hasher: FileHasher | None = None, plan_cache: bool = True,
                        hash_cache: bool = True, fsync: bool = True) -> QuantizeResult:
    """Quantize bf16 checkpoint dir ``ckpt`` into a pack-quantized checkpoint dir ``out`` (see module doc).

    ``input_hasher``: a :class:`~pack.checkpoint.FileHasher` already hashing ``ckpt``'s safetensors files (the
    CLI starts it before importing torch); used if its file list is this checkpoint's, else a new one is started.
    ``plan_cache``: read and store the model plan in pack.plancache (False: plan afresh, store nothing).
    ``hash_cache``: take unchanged input files' sha256 from pack.hashcache and store new ones (False: hash every
    file, store nothing); applies to the hasher started here (``input_hasher`` was started with its own choice).
    Either way the run stops if an input safetensors file changed while it was read (judged by size and mtime only
    when the hasher runs without the cache, for filesystems whose inodes or ctimes are not stable).
    ``fsync``: every output file is on disk before ``out`` is renamed into place, and the rename is synced (see
    pack.checkpoint.atomic_output_dir); False skips that (same bytes; recorded nowhere).
    Raises :class:`QuantizeError` (nothing written) for bad input or options.
    """
    t0 = time.perf_counter()
    recipe = recipe or QuantRecipe()
    # resolved (symlinks, "..") so that no spelling of a path lets the output replace or nest in the input
    ckpt, out = Path(ckpt).resolve(), Path(out).resolve()
    device = _check_device(device)
    max_bytes = parse_size(max_shard_size)
    if isinstance(vllm_max_model_len, bool) or not isinstance(vllm_max_model_len, int) or vllm_max_model_len < 1:
        raise QuantizeError(f"vllm_max_model_len {vllm_max_model_len!r}: must be a positive integer")
    try:
        check_output_dir(out, {"input": ckpt})
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    if out.exists() and not force:
        raise QuantizeError(f"{out}: output directory exists; pass --force to replace it")
    if force:
        try:
            check_replaceable(out)
        except FileExistsError as e:
            raise QuantizeError(str(e)) from None
    config = load_config(ckpt)  # cheap checks first: a bad config.json is reported before the weights
    created = _created()  # a bad SOURCE_DATE_EPOCH is reported here too, before any work
    try:
        previous = read_lineage(ckpt)  # carried into the output's lineage; a broken file stops us before any work
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    threads = torch.get_num_threads()
    files, _ = safetensors_files(ckpt)
    hasher = input_hasher
    if hasher is None or hasher.files != files:  # both absolute (ckpt is; FileHasher stores them so)
        if hasher is not None:
            hasher.close()
        hasher = FileHasher(files, use_cache=hash_cache)
    # the tensors are read through the hasher's descriptors: the hashes are of the bytes quantized
    with contextlib.closing(hasher), SourceFiles(ckpt, opened=hasher.fds) as src:
        if src.files != hasher.files:   # the index was rewritten between the two listings: hashes of other files
            raise QuantizeError(f"{ckpt / INDEX_NAME}: changed while pdqkit read it (it lists other weight files than "
                                f"at the start of the run); nothing was written: run again once the checkpoint is "
                                f"complete")
        try:
            with gc_paused():
                plan, plan_cached = cached_plan(ckpt, recipe, use_cache=plan_cache, config=config)
            dropped, cast = _check_inputs(plan, src, recipe)
            quantizer = Quantizer(src, recipe.observer_scheme(), device)
            shards = _shard(_plan_outputs(plan, src, recipe, set(cast), quantizer), max_bytes)
            n_tensors = sum(len(s) for s in shards)
            if device == "cpu":
                torch.set_num_threads(1)  # parallel over weights instead (see pack.pipeline)
            with atomic_output_dir(out, force=force, fsync=fsync) as tmp:
                bar = _progress(n_tensors, progress)
                t_stream = time.perf_counter()
                try:
                    try:
                        out_hashes, weight_map, total = _write_shards(tmp, shards, _workers(device), bar,
                                                                      writeback=fsync)
                    finally:  # an error message then starts on its own line, not glued to the bar's
                        bar.close()
                    t_stream = time.perf_counter() - t_stream
                    in_hashes = hasher.result()
                except (OSError, QuantizeError):
                    # a read that failed (deleted, truncated), garbage (NaN/Inf) in an input replaced under the run,
                    # or the hashing child finding a file gone: if the inputs changed, say that (bad input, exit 2),
                    # as the check below would, not the symptom
                    src.check_unchanged(hasher.states, strict=hasher.use_cache)
                    raise
                # every file read is the one whose header was read and whose hash the lineage records (for a
                # hasher without the cache, whose rule needs stable inodes and ctimes, by size and mtime only)
                src.check_unchanged(hasher.states, strict=hasher.use_cache)
                if len(shards) > 1:
                    n_params = sum(prod(o.shape) for sh in shards for o in sh)
                    json_dump({"metadata": {"total_parameters": n_params, "total_size": total},
                               "weight_map": dict(sorted(weight_map.items()))}, tmp / INDEX_NAME)
                step = lineage_step(
                    "quant", method=recipe.method, format="compressed-tensors/pack-quantized",
                    config_groups=recipe.config_groups(), ignore=list(recipe.ignore), rounding_mode=recipe.rounding,
                    equivalent_to=EQUIVALENT_TO[recipe.rounding], calibration=[], tool=_tool_info(),
                    input_dir=ckpt.name,
                    input_sha256=in_hashes, output_sha256=out_hashes, **created)
                _write_metadata(tmp, ckpt, previous, plan, recipe, step, out_hashes, total,
                                vllm_max_model_len, created)
                bytes_out = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))  # like bytes_in: weights
        finally:
            torch.set_num_threads(threads)
        bytes_in = src.nbytes   # no I/O: an input may be gone after the commit
    n_mod = len(plan.targeted)
    return QuantizeResult(out=out, quantized_modules=n_mod, quantized_tensors=3 * n_mod,
                          kept_tensors=n_tensors - 3 * n_mod, dropped=dropped, cast=cast, bytes_in=bytes_in,
                          bytes_out=bytes_out, seconds=time.perf_counter() - t0, peak_rss=_peak_rss(),
                          files_sha256=out_hashes, stream_seconds=t_stream, plan_cached=plan_cached,
                          hashes_cached=(hasher.cached, len(hasher.files)))


def _write_metadata(tmp: Path, ckpt: Path, previous: list[dict], plan: ModelPlan, recipe: QuantRecipe,
                    step: dict, out_hashes: dict, total: int, vllm_max_model_len: int, created: dict) -> None:
    """Aux files, lineage + quant_recipe.json, vllm_config.yaml, model card; config.json last. An input without a
    lineage gets a ``base`` step first (:func:`base_step`)."""
    copy_aux_files(ckpt, tmp)
    if not previous:
        previous = [base_step(ckpt, step["input_sha256"])]
    lineage = write_lineage(tmp, previous, step)
    json_dump({"schema": RECIPE_SCHEMA, **created, "tool": step["tool"], "source_lineage": lineage},
              tmp / RECIPE_FILE)
    (tmp / "vllm_config.yaml").write_text(card.vllm_config_yaml(plan, vllm_max_model_len))
    (tmp / "README.md").write_text(card.model_card(plan, recipe, lineage, files=out_hashes, total_bytes=total,
                                                   max_model_len=vllm_max_model_len))
    # config.json last: a temp dir left by a killed run never looks like a loadable checkpoint
    config = dict(plan.config)
    config["quantization_config"] = plan.quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="quantize", dynamic_ncols=True)
