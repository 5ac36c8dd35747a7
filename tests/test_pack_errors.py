"""Bad input: one clear line naming the file/tensor and the fix, exit status 2, no traceback, nothing left
behind (no output dir, no temp dir); ``kill -9`` mid-write leaves no checkpoint-looking directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pack.quantize import main

REPO = Path(__file__).resolve().parents[1]
WEIGHT = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Text-only micro Gemma-4 (KV-shared layers, PLE), bf16."""
    from bench.factory import save_random_checkpoint

    return save_random_checkpoint("micro", tmp_path_factory.mktemp("src") / "micro", vocab_size=16384)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    d = tmp_path / "in"
    shutil.copytree(pristine, d)
    return d


def test_checkpoints_written_get_the_usual_file_modes(pristine, tmp_path):
    """What prune, distill and the factory write (pack.checkpoint.save_bf16_checkpoint) and pack.quantize's output
    get a plain open's modes (0666 less the umask): safetensors 0.8's save_file alone writes model.safetensors 0600,
    which a vLLM server running as another user cannot read (a review's find)."""
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    assert main([str(pristine), "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    for d in (pristine, tmp_path / "q"):
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in d.iterdir() if f.is_file()}
        assert "model.safetensors" in modes and set(modes.values()) == {oct(want)}, (d, modes)


def _fails(capsys, args, *needles) -> str:
    """Run the CLI in-process; assert exit 2, a single 'error:' line holding ``needles``, nothing written."""
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    capsys.readouterr()  # drop what fixtures printed
    rc = main([*map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


def _around_streaming(monkeypatch, before=None, after=None) -> None:
    """Run ``before()`` just before the run streams the weights (headers read, plan built) and ``after()`` just
    after (output files written, nothing committed yet)."""
    import pack.writer as writer

    real = writer._write_shards

    def wrapped(*a, **k):
        if before:
            before()
        result = real(*a, **k)
        if after:
            after()
        return result

    monkeypatch.setattr(writer, "_write_shards", wrapped)


def _edit_weights(d: Path, fn) -> None:
    f = d / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").unlink()
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "config.json: missing")


def test_garbled_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_text('{"model_type": "gemma4_text", ')
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "config.json: not valid JSON")


def test_missing_input_dir(tmp_path, capsys):
    _fails(capsys, [tmp_path / "nope", "-o", tmp_path / "o"], "no such checkpoint directory")


def test_truncated_safetensors(ckpt, tmp_path, capsys):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "model.safetensors: not a valid safetensors file", "truncated")


def test_lying_header(ckpt, tmp_path, capsys):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = header[WEIGHT]["data_offsets"]
    header[WEIGHT]["data_offsets"] = [a, b + 64]  # points past its neighbour
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + data[8 + n:])
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "model.safetensors: not a valid safetensors file")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight(ckpt, tmp_path, capsys, value):
    def poison(t):
        t[WEIGHT][3, 17] = value
    _edit_weights(ckpt, poison)
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], WEIGHT, "NaN/Inf", "[3, 17]")


def test_nan_passthrough(ckpt, tmp_path, capsys):
    def poison(t):
        t["model.embed_tokens.weight"][5, 5] = float("nan")
    _edit_weights(ckpt, poison)
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "model.embed_tokens.weight holds NaN")


def test_k_not_multiple_of_group(tmp_path, capsys):
    from bench.factory import save_random_checkpoint

    d = save_random_checkpoint("micro", tmp_path / "odd", intermediate_size=320, vocab_size=512)
    err = _fails(capsys, [d, "-o", tmp_path / "o"], "model.layers.0.mlp.down_proj", "K=320")
    assert "not a multiple of group_size 128" in err and "--extra-ignore model.layers.0.mlp.down_proj" in err
    # the fix the message gives works (here for every layer's down_proj)
    assert main([str(d), "-o", str(tmp_path / "o"), "--no-progress", "--extra-ignore", "re:.*down_proj"]) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in cfg["ignore"]


def test_fp32_linear_weight(ckpt, tmp_path, capsys):
    _edit_weights(ckpt, lambda t: t.__setitem__(WEIGHT, t[WEIGHT].float()))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], WEIGHT, "is F32, not BF16", "torch.bfloat16")


def test_an_fp32_fused_linear_names_its_whole_group_to_ignore(ckpt, tmp_path, capsys):
    """An fp32 q_proj: the --extra-ignore the message offers names the layer's q/k/v (vLLM fuses them and refuses
    mixed schemes; before, the message named q_proj alone, and following it was refused), and following it works."""
    qkv = [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]
    _edit_weights(ckpt, lambda t: t.__setitem__(f"{qkv[0]}.weight", t[f"{qkv[0]}.weight"].float()))
    err = _fails(capsys, [ckpt, "-o", tmp_path / "o"], "is F32, not BF16")
    assert f"--extra-ignore {' '.join(qkv)}" in err, err
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(tmp_path / "o"), "--no-progress", "--extra-ignore", *qkv]) == 0
    assert set(qkv) <= set(json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["ignore"])


def test_fp32_config_dtype(ckpt, tmp_path, capsys):
    _edit_config(ckpt, lambda c: c.__setitem__("dtype", "float32"))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "config.json: dtype is 'float32'", "bfloat16")


def test_fp32_passthrough_is_cast(ckpt, tmp_path, capsys):
    norm = "model.layers.0.input_layernorm.weight"
    orig = load_file(ckpt / "model.safetensors")[norm]
    _edit_weights(ckpt, lambda t: t.__setitem__(norm, t[norm].float() + 1e-4))
    assert main([str(ckpt), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    got = load_file(tmp_path / "o" / "model.safetensors")[norm]
    assert got.dtype == torch.bfloat16 and torch.equal(got, (orig.float() + 1e-4).bfloat16())


def test_already_quantized(ckpt, tmp_path, capsys):
    assert main([str(ckpt), "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    capsys.readouterr()
    _fails(capsys, [tmp_path / "q", "-o", tmp_path / "o"], "already quantized")
    # same when only the tensors say so
    q = tmp_path / "q"
    _edit_config(q, lambda c: c.pop("quantization_config"))
    _fails(capsys, [q, "-o", tmp_path / "o"], "is already quantized", ".weight_")


def test_output_exists(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main([str(ckpt), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "output directory exists; pass --force" in err and (out / "keep.txt").is_file()
    # --force replaces an earlier output, not a folder of other files (`-o . --force` deleted the cwd's files)
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 2
    assert "a folder with files but not a checkpoint" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")   # an earlier output
    (out / "model.safetensors").write_text("old")
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    (tmp_path / "f").write_text("a file")
    assert main([str(ckpt), "-o", str(tmp_path / "f"), "--no-progress", "--force"]) == 2
    assert "a file, not an output directory" in capsys.readouterr().err and (tmp_path / "f").read_text() == "a file"


def test_output_inside_input(ckpt, capsys):
    _fails(capsys, [ckpt, "-o", ckpt / "sub"], "must not be, contain or lie inside the input")


def test_output_spelled_to_reach_the_input(ckpt, tmp_path, capsys, monkeypatch):
    """Other spellings of the input (``..`` through a dir that does not exist yet, a symlinked parent) must not
    let the output replace it: the paths are compared resolved."""
    before = (ckpt / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(tmp_path / "nosuch" / ".." / "in"), "--no-progress"]) == 2
    assert "must not be, contain or lie inside the input" in capsys.readouterr().err
    assert not (tmp_path / "nosuch").exists()
    (tmp_path / "alias").symlink_to(tmp_path)
    assert main([str(ckpt), "-o", str(tmp_path / "alias" / "in"), "--force", "--no-progress"]) == 2
    assert "must not be, contain or lie inside the input" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").read_bytes() == before and not (ckpt / "quant_recipe.json").exists()
    # run from inside the checkpoint with CKPT "..": the default output is a sibling named after the real dir
    (ckpt / "sub").mkdir()
    monkeypatch.chdir(ckpt / "sub")
    assert main(["..", "--no-progress"]) == 0
    assert (tmp_path / "in-w4a16" / "config.json").is_file() and not (ckpt / "sub" / "..-w4a16").exists()


def test_tied_module_targeted(ckpt, tmp_path, capsys):
    """Gemma-4's lm_head is tied to the embeddings: an --ignore list without it names the fix instead of
    crashing (or writing a checkpoint that does not load)."""
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--ignore", "re:.*per_layer.*"], "lm_head is targeted but its "
           "weight is tied", "--extra-ignore lm_head")


@pytest.mark.parametrize("content, needle", [("{bad", "not valid JSON"), ("[]", "not a lineage file"),
                                             ('{"source_lineage": [{"kind": "base"}]}', "not a lineage file")])
def test_broken_lineage_in_input(ckpt, tmp_path, capsys, content, needle):
    (ckpt / "pdqkit_lineage.json").write_text(content)
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "pdqkit_lineage.json: " + needle, "delete or fix the file")


def test_bad_index(ckpt, tmp_path, capsys):
    # (a model.safetensors beside the index would be what from_pretrained reads, the index ignored: a shard here)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": 1}}')
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "not a valid safetensors index")
    (ckpt / "model.safetensors.index.json").write_bytes(b'\xff\xfe{}')
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "not a valid safetensors index")


def test_output_containing_the_input(ckpt, tmp_path, capsys):
    """``--force`` on a parent of the input would delete the input with it: refused, input untouched."""
    before = (ckpt / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(tmp_path), "--force", "--no-progress"]) == 2
    assert "must not be, contain or lie inside the input" in capsys.readouterr().err
    assert (ckpt / "model.safetensors").read_bytes() == before


def test_os_error_is_one_line(ckpt, tmp_path):
    (tmp_path / "afile").write_text("not a dir")
    r = subprocess.run([sys.executable, "-m", "pack.quantize", str(ckpt), "-o", str(tmp_path / "afile" / "x"),
                        "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "nothing was written" in r.stderr


def test_checkpoint_swallowed_by_ignore(ckpt, tmp_path, capsys):
    _fails(capsys, ["-o", tmp_path / "o", "--extra-ignore", "lm_head", ckpt], "no input checkpoint",
           "was read as an --ignore pattern: put CKPT before --ignore/--extra-ignore")


def test_bad_environment_and_patterns(ckpt, tmp_path, capsys, monkeypatch):
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--extra-ignore", "re:("], "'re:(': not a valid regular expression")
    for size in ("0.5B", "1e400GB", "nanGB"):
        _fails(capsys, [ckpt, "-o", tmp_path / "o", "--max-shard-size", size], "--max-shard-size")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "abc")
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "SOURCE_DATE_EPOCH='abc': not a Unix time")


def test_error_after_the_progress_bar_starts_on_its_own_line(ckpt, tmp_path):
    _edit_weights(ckpt, lambda t: t[WEIGHT].view(-1).__setitem__(3, float("nan")))
    r = subprocess.run([sys.executable, "-m", "pack.quantize", str(ckpt), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: ") and WEIGHT in last, r.stderr[-500:]


@pytest.mark.parametrize("arch, model_type, needle", [
    ("FooForCausalLM", "gemma4_text", "unknown architecture 'FooForCausalLM'"),
    ("FooForCausalLM", "foo", "cannot read this config (model_type 'foo'"),
])
def test_unknown_architecture(ckpt, tmp_path, capsys, arch, model_type, needle):
    _edit_config(ckpt, lambda c: c.update(architectures=[arch], model_type=model_type))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], needle)


def test_config_does_not_match_weights(ckpt, tmp_path, capsys):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.2.self_attn.o_proj.weight"))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "model.layers.2.self_attn.o_proj.weight is missing")
    _edit_config(ckpt, lambda c: c.update(intermediate_size=768))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "has shape", "config.json implies")


def test_config_transformers_cannot_build(ckpt, tmp_path, capsys):
    _edit_config(ckpt, lambda c: c.update(num_hidden_layers=7, layer_types=c["layer_types"] + ["sliding_attention"]))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "config.json: transformers cannot build Gemma4ForCausalLM")


def test_bad_options(ckpt, tmp_path, capsys):
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--group-size", "100"], "--group-size")
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--device", "tpu"], "--device 'tpu'")
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--max-shard-size", "lots"], "--max-shard-size")
    if not torch.cuda.is_available():
        _fails(capsys, [ckpt, "-o", tmp_path / "o", "--device", "cuda"], "no CUDA device")


def test_cli_process_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pack.quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# A stop signal raises KeyboardInterrupt wherever the main thread is. Inside threading's own locking it can surface
# as another error (CI saw SIGTERM during Thread.start end as "RuntimeError: release unlocked lock", exit 1). This
# stand-in for stream_file makes that happen on purpose: the signal arrives, the interrupt turns into RuntimeError.
_SIGNAL_TURNS_INTO_ERROR = """
import os, signal, sys, time
import pack.writer
from pack.quantize import main

def stream_file(*args, **kwargs):
    try:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(30)  # the handler runs here, in the main thread
    except KeyboardInterrupt:
        raise RuntimeError("release unlocked lock") from None
    raise AssertionError("the signal never arrived")

pack.writer.stream_file = stream_file
# start as a foreground run does: the suite itself may run as a background job (`nohup pytest &`), whose children
# start with SIGINT ignored, and the CLI then keeps ignoring it (the test below)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_that_surfaces_as_another_error_is_reported_as_interrupt(ckpt, tmp_path, sig):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _SIGNAL_TURNS_INTO_ERROR.format(sig=sig), str(ckpt), "-o", str(out),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    want = "error: interrupted (then RuntimeError: release unlocked lock); nothing was written"
    assert r.returncode == 130 and r.stderr.strip() == want, r.stderr[-800:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.name]), list(tmp_path.iterdir())


# Started with SIGINT ignored (a background job of a script, nohup): the run keeps ignoring it.
_SIGINT_WHILE_IGNORED = """
import os, signal, sys, time
import pack.writer
from pack.quantize import main

real = pack.writer.stream_file
def stream_file(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # a handler would run here
    return real(*args, **kwargs)

pack.writer.stream_file = stream_file
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(main(sys.argv[1:]))
"""


def test_ignored_sigint_stays_ignored(ckpt, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _SIGINT_WHILE_IGNORED, str(ckpt), "-o", str(out), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_write_leaves_no_checkpoint(tmp_path, sig):
    """``kill -9`` leaves at most a hidden temp dir without config.json; SIGTERM (timeout, Slurm, docker stop) is
    handled like Ctrl-C: exit 130, one line, nothing left at all."""
    from bench.factory import save_random_checkpoint

    # large embeddings (~170 MB file): the write lasts long enough to be caught in the act
    ckpt = save_random_checkpoint("micro", tmp_path / "big-vocab", vocab_size=131072)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pack.quantize", str(ckpt), "-o", str(out), "--no-progress"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    killed_mid_write = False
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = [p for p in tmp_path.glob(f".{out.name}.tmp-*/model.safetensors") if p.stat().st_size > 0]
        if tmp:
            os.kill(proc.pid, sig)
            killed_mid_write = True
            break
        time.sleep(0.001)
    try:
        err = proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:  # a cleanup that hangs fails here instead of stalling the suite
        proc.kill()
        proc.communicate()
        pytest.fail(f"the run did not end within 120 s of {signal.Signals(sig).name}")
    assert killed_mid_write, "the run finished before it could be killed mid-write"
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        for p in tmp_path.iterdir():  # only the input and the hidden, config-less temp dir remain
            if p.name != ckpt.name:
                assert p.name.startswith(f".{out.name}.tmp-") and not (p / "config.json").exists(), p
    else:
        assert proc.returncode == 130 and err.strip() == "error: interrupted; nothing was written", err[-800:]
        assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


@pytest.mark.parametrize("extra", [[], ["--no-hash-cache"]])
def test_input_touched_while_read(ckpt, tmp_path, capsys, monkeypatch, extra):
    """A file written, touched or replaced while the run reads it: its bytes, header and lineage hash may be of
    different versions, so the run stops and writes nothing (without the hash cache judged by size and mtime)."""
    # same bytes, the current time (copytree kept the source's mtime)
    _around_streaming(monkeypatch, after=lambda: os.utime(ckpt / "model.safetensors"))
    _fails(capsys, [ckpt, "-o", tmp_path / "out", *extra], "model.safetensors: changed while pdqkit read it",
           "run again once the checkpoint is complete")


def test_input_deleted_while_read(ckpt, tmp_path, capsys, monkeypatch):
    _around_streaming(monkeypatch, after=(ckpt / "model.safetensors").unlink)
    _fails(capsys, [ckpt, "-o", tmp_path / "out"], "model.safetensors: cannot read it any more",
           "nothing was written")


def test_input_deleted_before_it_was_streamed(ckpt, tmp_path, capsys, monkeypatch):
    """An input deleted after its header was read but before the quantizer opened it (a review's repro): the
    bad-input error, not the raw errno of the failed open (exit 1 before)."""
    _around_streaming(monkeypatch, before=(ckpt / "model.safetensors").unlink)
    _fails(capsys, [ckpt, "-o", tmp_path / "out"], "model.safetensors: cannot read it any more",
           "nothing was written")


def test_input_replaced_with_garbage_before_it_was_streamed(ckpt, tmp_path, capsys, monkeypatch):
    """An input replaced (rename over) by a file of the same size whose weights are NaN, after its header was read:
    the run says the input changed, not that the model holds NaN."""
    bad = tmp_path / "bad.safetensors"
    t = load_file(ckpt / "model.safetensors")
    t[WEIGHT] = torch.full_like(t[WEIGHT], float("nan"))
    save_file(t, bad, metadata={"format": "pt"})
    _around_streaming(monkeypatch, before=lambda: os.replace(bad, ckpt / "model.safetensors"))
    _fails(capsys, [ckpt, "-o", tmp_path / "out"], "model.safetensors: changed while pdqkit read it",
           "nothing was written")


def test_input_truncated_between_validation_and_header_read(ckpt, tmp_path, capsys, monkeypatch):
    """The header is read through a second open after safetensors validated the file: a file truncated in between
    gives the one-line changed-input error, not a struct.error traceback (a review's repro)."""
    import contextlib

    import safetensors

    real = safetensors.safe_open

    @contextlib.contextmanager
    def then_truncate(path, *a, **k):
        with real(path, *a, **k) as f:
            yield f
        os.truncate(path, 4)

    monkeypatch.setattr(safetensors, "safe_open", then_truncate)
    _fails(capsys, [ckpt, "-o", tmp_path / "out"], "model.safetensors: changed while pdqkit read it",
           "nothing was written")


def test_output_that_appears_during_the_run_is_kept(ckpt, tmp_path, capsys, monkeypatch):
    """Two runs with the same output dir (e.g. the default CKPT-w4a16 for two recipes): without --force, the one
    that finishes second finds the other's output in place and fails (exit 2), keeping it; before, both reported
    success and the later silently replaced the earlier. With --force the later replaces it, as asked."""
    out = tmp_path / "out"

    def other_run_finishes_first():
        out.mkdir()
        (out / "config.json").write_text("the other run's")

    _around_streaming(monkeypatch, after=other_run_finishes_first)
    capsys.readouterr()
    rc = main([str(ckpt), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "appeared while this run wrote its output" in err and "pass --force" in err, err
    assert (out / "config.json").read_text() == "the other run's" and sorted(p.name for p in out.iterdir()) == [
        "config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp dir left
    shutil.rmtree(out)
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())


def test_input_deleted_after_the_output_was_committed(ckpt, tmp_path, capsys, monkeypatch):
    """An input that disappears after the output is in place does not turn a finished run into "nothing was
    written" (exit 1 before: the summary stat'ed the inputs after the commit)."""
    import contextlib

    import pack.writer as writer

    real = writer.atomic_output_dir

    @contextlib.contextmanager
    def then_delete(*a, **k):
        with real(*a, **k) as tmp:
            yield tmp
        (ckpt / "model.safetensors").unlink()

    monkeypatch.setattr(writer, "atomic_output_dir", then_delete)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


def test_input_deleted_before_the_hasher_read_it(ckpt, tmp_path, capsys, monkeypatch):
    """The input hasher is a child process that reads the files at its own pace: when it finds a file deleted (a
    race the test above can hit on a loaded machine, CI of 179366c), the error is the same bad-input one, not the
    hasher's own failure."""
    import pack.checkpoint as checkpoint

    def child_failed(self):
        raise OSError(f"hashing the input failed: {ckpt / 'model.safetensors'}: cannot read it (No such file or "
                      "directory)")

    _around_streaming(monkeypatch, after=(ckpt / "model.safetensors").unlink)
    monkeypatch.setattr(checkpoint.FileHasher, "result", child_failed)
    _fails(capsys, [ckpt, "-o", tmp_path / "out"], "model.safetensors: cannot read it any more",
           "nothing was written")


def test_input_replaced_after_the_hasher_started(ckpt, tmp_path):
    """The CLI starts hashing before torch is imported; a file replaced after that (a download finishing) is not
    the one the hash is of, even with the same bytes. Without the hash cache (size and mtime only) a copy that
    keeps both passes: the rule for filesystems whose inodes are not stable."""
    from pack.checkpoint import FileHasher
    from pack.errors import QuantizeError
    from pack.writer import quantize_checkpoint

    f = ckpt / "model.safetensors"
    for use_cache in (True, False):
        hasher = FileHasher([f.resolve()], use_cache=use_cache)
        hasher.result()
        copy = tmp_path / "copy.safetensors"
        shutil.copy2(f, copy)  # the bytes and the mtime
        os.replace(copy, f)  # another inode and ctime
        if use_cache:
            with pytest.raises(QuantizeError, match="changed while pdqkit read it"):
                quantize_checkpoint(ckpt, tmp_path / "out", input_hasher=hasher)
            assert not (tmp_path / "out").exists()
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        else:
            quantize_checkpoint(ckpt, tmp_path / "out", input_hasher=hasher, hash_cache=False)
            assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("rewrite", ["a shard renamed", "a shard dropped"])
def test_index_rewritten_between_the_two_listings(ckpt, tmp_path, monkeypatch, rewrite):
    """The writer lists the shards for the input hasher, then the reader lists them again: an index rewritten in
    between (a re-save finishing) would have the lineage hash one set of files and the run read another. Refused
    as a changed input, nothing written (a review's repro: with a shard renamed the run succeeded before). A shard
    the hasher did not open is refused by the reader; a hashed shard no longer listed, by the writer."""
    import pack.writer as writer
    from pack.errors import QuantizeError

    t = load_file(ckpt / "model.safetensors")
    names = sorted(t)
    (ckpt / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in shards.items():
        save_file({n: t[n] for n in ns}, ckpt / f, metadata={"format": "pt"})
    wm = {n: f for f, ns in shards.items() for n in ns}
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if rewrite == "a shard renamed":
        shutil.copy(ckpt / "model-00002-of-00002.safetensors", ckpt / "model-00003.safetensors")
        v2 = {n: "model-00003.safetensors" if f.startswith("model-00002") else f for n, f in wm.items()}
    else:
        v2 = {n: f for n, f in wm.items() if f.startswith("model-00001")}
    real = writer.safetensors_files

    def listed_then_rewritten(c):
        listed = real(c)
        index.write_text(json.dumps({"metadata": {}, "weight_map": v2}))
        return listed

    monkeypatch.setattr(writer, "safetensors_files", listed_then_rewritten)
    why = "or was not listed then" if rewrite == "a shard renamed" else "it lists other weight files than at the start"
    with pytest.raises(QuantizeError, match=f"changed while pdqkit read it \\(.*{why}"):
        writer.quantize_checkpoint(ckpt, tmp_path / "out", hash_cache=False)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_input_replaced_unseen_is_still_read_as_it_was_hashed(ckpt, tmp_path):
    """Without the hash cache a change is judged by size and mtime only, so a file replaced (rename onto it) by
    other bytes of the same size and mtime after the hasher opened it is not seen. The run still reads one version:
    the tensors, like the hash, come through the descriptors the hasher opened, so the output and its lineage are
    those of the bytes hashed. Before, the hash was of the first file and the tensors of the second."""
    import hashlib

    from pack.checkpoint import FileHasher
    from pack.writer import quantize_checkpoint

    f = ckpt / "model.safetensors"
    first = f.read_bytes()
    ref = tmp_path / "ref" / ckpt.name   # the same input, never replaced
    shutil.copytree(ckpt, ref)
    quantize_checkpoint(ref, tmp_path / "ref-out", hash_cache=False)

    hasher = FileHasher([f.resolve()], use_cache=False)
    other = load_file(f)
    other[WEIGHT] = -other[WEIGHT]
    save_file(other, tmp_path / "other.safetensors", metadata={"format": "pt"})
    st = f.stat()
    assert (tmp_path / "other.safetensors").stat().st_size == st.st_size
    os.utime(tmp_path / "other.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "other.safetensors", f)   # before the run reads a header or a tensor
    quantize_checkpoint(ckpt, tmp_path / "out", input_hasher=hasher, hash_cache=False)

    out, want = tmp_path / "out", tmp_path / "ref-out"
    assert (out / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
    (step, ) = [s for s in json.loads((out / "quant_recipe.json").read_text())["source_lineage"] if s["kind"] == "quant"]
    assert step["input_sha256"] == {"model.safetensors": hashlib.sha256(first).hexdigest()}


def test_a_hub_style_snapshot_of_symlinks_is_not_a_change(ckpt, tmp_path, capsys):
    """The Hugging Face hub cache: snapshot files are symlinks to blobs; the states are the blobs'."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for p in ckpt.iterdir():
        shutil.move(str(p), blobs / p.name)
        (snap / p.name).symlink_to(blobs / p.name)
    for run in ("cold", "warm"):
        capsys.readouterr()
        assert main([str(snap), "-o", str(tmp_path / run), "--no-progress"]) == 0, capsys.readouterr().err
    cold, warm = (tmp_path / run / "model.safetensors" for run in ("cold", "warm"))
    assert warm.read_bytes() == cold.read_bytes()


def test_partly_ignored_fused_set_is_refused(ckpt, tmp_path, capsys):
    """vLLM loads q/k/v (and gate/up) of a layer as one Linear and refuses mixed schemes: ignoring some of a set is
    refused, naming the module; ignoring all of it (or none) is fine."""
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--extra-ignore", r"re:.*layers\.0\.self_attn\.k_proj$"],
           "model.layers.0.self_attn.k_proj is ignored but model.layers.0.self_attn.q_proj is quantized",
           "ignore all of q_proj, k_proj, v_proj there, or none")
    _fails(capsys, [ckpt, "-o", tmp_path / "o", "--extra-ignore", "model.layers.1.mlp.up_proj"],
           "model.layers.1.mlp.up_proj is ignored but model.layers.1.mlp.gate_proj is quantized")
    assert main([str(ckpt), "-o", str(tmp_path / "ok"), "--no-progress", "--extra-ignore",
                 r"re:.*layers\.0\.self_attn\.[qkv]_proj$", "model.layers.1.mlp.gate_proj",
                 "model.layers.1.mlp.up_proj"]) == 0, capsys.readouterr().err


def test_force_runs_that_race_for_the_same_output(ckpt, tmp_path, capsys, monkeypatch):
    """Two --force runs with the same output dir. (1) The other run moves the previous copy aside between this
    run's check and its own move: this run has nothing to replace, and commits. (2) The other run's output takes
    the place this run just emptied: this run fails with exit 2, keeps the other's output, and names where the
    copy it had moved aside is (before: a raw "Directory not empty" with exit 1, and that copy left unnamed)."""
    from pack import checkpoint

    out = tmp_path / "out"
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 0
    real = checkpoint.os.replace
    moved = []

    def others_move_first(src, dst):   # (1): the other run's os.replace(out, its old) lands first
        if Path(src) == out and not moved:
            moved.append(tmp_path / "elsewhere")
            real(out, moved[0])
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", others_move_first)
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 0, capsys.readouterr().err
    assert moved and (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp or old dir left

    def others_output_lands(src, dst):   # (2): just after this run moved the previous copy aside
        result = real(src, dst)
        if Path(src) == out:
            out.mkdir()
            (out / "config.json").write_text("the other run's")
        return result

    monkeypatch.setattr(checkpoint.os, "replace", others_output_lands)
    rc = main([str(ckpt), "-o", str(out), "--no-progress", "--force"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "appeared while this run wrote its output" in err and "nothing was written" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "the other run's"
    olds = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(olds) == 1 and f"the copy it was to replace is at {olds[0] / 'x'}" in err, err
    assert (olds[0] / "x" / "model.safetensors").is_file()   # the previous copy, intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


@pytest.mark.parametrize("when", ["after the move aside", "after the rename"])
def test_force_swap_interrupted(ckpt, tmp_path, capsys, monkeypatch, when):
    """A stop signal lands the moment one of the --force swap's renames returns. After the previous copy was moved
    aside: it is put back, and the run says nothing was written. After the new output was renamed into place: the
    run says it was written and where the previous copy remains (before: "nothing was written" both times, and
    the previous copy left in .out.old-XXXX, unnamed)."""
    from pack import checkpoint

    out = tmp_path / "out"
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 0
    before = (out / "model.safetensors").read_bytes()
    (out / "mark").write_text("the previous copy")
    name = "replace" if when == "after the move aside" else "rename"
    real = getattr(checkpoint.os, name)

    def then_interrupted(src, dst):
        result = real(src, dst)
        if (Path(src) == out) if name == "replace" else (Path(dst) == out):
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(checkpoint.os, name, then_interrupted)
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted") and "\n" not in err, err
    olds = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if when == "after the move aside":
        assert err == "error: interrupted; nothing was written", err
        assert (out / "mark").read_text() == "the previous copy" and not olds   # put back
    else:
        assert f"{out} was written" in err and "nothing was written" not in err, err
        assert len(olds) == 1 and f"the previous copy remains at {olds[0]}" in err, err
        assert not (out / "mark").exists() and (olds[0] / "x" / "mark").is_file()
    assert (out / "model.safetensors").read_bytes() == before


def test_a_dangling_symlink_at_the_output(ckpt, tmp_path, capsys):
    """A symlink to nothing where an output dir goes. atomic_output_dir (prune's and distill's writes too) treats
    it as an existing output: refused without force, the link replaced with it (before: a rename onto the link,
    ENOTDIR, reported as "appeared while this run wrote its output" on every run). pack.quantize resolves OUT
    first, so its output goes where the link points."""
    from pack.checkpoint import atomic_output_dir

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="output directory exists; pass --force"):
        with atomic_output_dir(link):
            pass
    with atomic_output_dir(link, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert not link.is_symlink() and (link / "f").read_text() == "new" and not (tmp_path / "nowhere").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link.")]   # no temp or old dir left

    out = tmp_path / "out"
    out.symlink_to(tmp_path / "target")
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert out.is_symlink() and (tmp_path / "target" / "model.safetensors").is_file()


def test_index_with_shards_in_a_subfolder(ckpt, tmp_path, capsys):
    (ckpt / "a").mkdir()
    shutil.move(str(ckpt / "model.safetensors"), ckpt / "a" / "model.safetensors")
    names = load_file(ckpt / "a" / "model.safetensors").keys()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "a/model.safetensors" for k in names}}))
    _fails(capsys, [ckpt, "-o", tmp_path / "o"], "shard a/model.safetensors is not a file name beside the index")


def test_interrupt_after_the_output_is_in_place_says_so(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C while --force deletes the previous output (after the new one is in place) must not report "nothing
    was written": the new output is complete."""
    from pack import checkpoint

    out = tmp_path / "o"
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 0
    real = checkpoint.shutil.rmtree

    def interrupted(path, *a, **kw):
        if Path(path).name.startswith(".o.old-"):
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    capsys.readouterr()
    assert main([str(ckpt), "-o", str(out), "--no-progress", "--force"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: interrupted: {out} was written") and "nothing was written" not in err, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("failure", ["interrupt", "eio"])
def test_a_failed_sync_after_the_rename_says_the_output_is_written(ckpt, tmp_path, capsys, monkeypatch, failure):
    """The directory fsyncs run after the output is in place: a Ctrl-C or an I/O error there must say that the
    output was written (and that its durability is unconfirmed), never "nothing was written"."""
    import errno

    from pack import checkpoint

    out = tmp_path / "o"
    real = checkpoint.fsync_dir

    def failing(d):
        if out.exists():   # only once the rename has happened
            if failure == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.EIO, "Input/output error")
        return real(d)

    monkeypatch.setattr(checkpoint, "fsync_dir", failing)
    capsys.readouterr()
    rc = main([str(ckpt), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert "nothing was written" not in err and len(err.splitlines()) == 1, err
    if failure == "interrupt":
        assert rc == 130 and err.startswith(f"error: interrupted: {out} was written; interrupted while syncing"), err
    else:
        assert rc == 1 and err.startswith(f"error: {out} was written, but syncing it to disk failed "
                                          "(Input/output error)") and "--force" in err, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_input_without_lineage_gets_a_base_step(ckpt, tmp_path, capsys):
    """Spec §6: every step but the base names its ``from``. A plain Hugging Face checkpoint (no lineage) gets a
    ``base`` step: a hub snapshot by hub id and revision, any other dir by name; with the input's sha256. The
    summary's GB out counts the weight files, as GB in does."""
    import hashlib

    from pack.writer import quantize_checkpoint

    (ckpt / "pdqkit_lineage.json").unlink()
    snap = tmp_path / "hub" / "models--google--gemma-4-E4B-it" / "snapshots" / "0123abc"
    shutil.copytree(ckpt, snap)
    sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    for src, model, revision in ((ckpt, "in", None), (snap, "google/gemma-4-E4B-it", "0123abc")):
        res = quantize_checkpoint(src, tmp_path / f"o-{model[:2]}", progress=False)
        steps = json.loads((res.out / "quant_recipe.json").read_text())["source_lineage"]
        assert [(s["id"], s.get("from")) for s in steps] == [("base", None), ("quant", "base")]
        assert (steps[0]["model"], steps[0]["revision"], steps[0]["files_sha256"]) == \
            (model, revision, {"model.safetensors": sha})
        assert res.bytes_out == (res.out / "model.safetensors").stat().st_size


def test_a_path_with_dotdot_reuses_the_early_hasher(ckpt, tmp_path, capsys, monkeypatch):
    """The CLI starts hashing the input before importing torch; a CKPT spelled with ``..`` must not make the writer
    throw that hasher away and hash everything again."""
    from pack import checkpoint

    made = []
    real = checkpoint.FileHasher.__init__

    def counting(self, files, *a, **kw):
        made.append([str(f) for f in files])
        real(self, files, *a, **kw)

    monkeypatch.setattr(checkpoint.FileHasher, "__init__", counting)
    (tmp_path / "x").mkdir()
    assert main([str(tmp_path / "x" / ".." / "in"), "-o", str(tmp_path / "o"), "--no-progress",
                 "--no-hash-cache"]) == 0, capsys.readouterr().err
    assert made == [[str(ckpt.resolve() / "model.safetensors")]]
