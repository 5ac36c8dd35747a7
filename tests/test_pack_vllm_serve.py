"""CPU tests of the `vllm serve` client in bench/gpu/pack_vllm_check.py (``serve_generate``).

The real server runs on the GPU machine only; here a stand-in HTTP server (stdlib ``http.server``) takes its
place on the command line. It answers like vLLM 0.26.0's OpenAI server does for the fields the client reads
(``/health``; ``/v1/completions`` with ``return_token_ids`` and ``return_tokens_as_token_ids`` log-probs), with
tokens computed from each prompt by a rule the test checks independently.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from bench.gpu import pack_vllm_check as pvc

FAKE = textwrap.dedent('''
    import json, os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from pathlib import Path

    args = sys.argv[1:]
    assert args[0] == "serve", args
    ckpt, opts = Path(args[1]), args[2:]
    get = lambda k: opts[opts.index(k) + 1]
    assert Path(get("--config")) == ckpt / "vllm_config.yaml" and Path(get("--config")).is_file()
    mode = (ckpt / "mode").read_text().strip()
    (ckpt / "pid").write_text(str(os.getpid()))
    if mode == "die":
        sys.exit(3)
    if mode == "busy" and not (ckpt / "tried").exists():  # the port was taken between pick and bind: once
        (ckpt / "tried").write_text("")
        print("INFO pdqkit: a line of the attempt that failed", flush=True)
        print("ERROR: [Errno 98] error while attempting to bind: address already in use", flush=True)
        sys.exit(1)
    (ckpt / "env.json").write_text(json.dumps({k: v for k, v in os.environ.items()
                                               if k.startswith(("PDQKIT", "VLLM", "TORCHINDUCTOR"))}))
    kernel = os.environ.get("PDQKIT_VLLM_KERNEL")
    if kernel:  # the line pdqkit's plugin logs when vLLM loads it
        print(f"INFO pdqkit: PDQKIT_VLLM_KERNEL={kernel}, PdqkitExactLinearKernel registered first", flush=True)
        print("(EngineCore pid=7) INFO pdqkit: hint " + "x" * 500, flush=True)  # long: its head is kept
    print("INFO Using MacheteLinearKernel for CompressedTensorsWNA16", flush=True)
    time.sleep(0.5)  # not ready at once: the client must poll /health

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200 if self.path == "/health" else 404, {})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if mode == "drop":  # dies mid-request
                os._exit(1)
            if mode == "badstatus":  # not HTTP at all
                self.wfile.write(b"garbage\\r\\n\\r\\n")
                self.wfile.flush()
                self.close_connection = True
                return
            if mode == "garbage":
                self.send_response(200)
                self.send_header("Content-Length", "9")
                self.end_headers()
                self.wfile.write(b"not json!")
                return
            assert req["repetition_penalty"] == 1.0 and req["logprobs"] == 5
            assert req["model"] == get("--served-model-name") and req["temperature"] == 0.0
            assert req["return_token_ids"] and req["return_tokens_as_token_ids"] and req["ignore_eos"]
            n = req["max_tokens"] - (mode == "short")
            lp = (None if mode == "nologprobs" else
                  lambda p: {"top_logprobs": [{f"token_id:{sum(p) % 97}": -0.25, "token_id:1": -2.0}]})
            choices = [{"index": i, "text": "", "token_ids": [(sum(p) + j) % 97 for j in range(n)],
                        "logprobs": lp(p) if lp else None}
                       for i, p in enumerate(req["prompt"])]
            self._send(200, {"choices": choices[::-1]})  # any order: the client sorts by index

    signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
    HTTPServer((get("--host"), int(get("--port"))), H).serve_forever()
''')


def _ckpt(tmp_path, mode):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "vllm_config.yaml").write_text('dtype: "bfloat16"\n')
    (d / "mode").write_text(mode)
    (d / "tokenizer.json").write_text("{}")
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE)
    return d, [sys.executable, str(fake)]


PROMPTS = [[5, 6, 7], [100, 3], [42]]


def _gone(pid_file) -> bool:
    """The process whose pid the stand-in wrote is no longer running (stopped and reaped)."""
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return True
    return False


def _expected(prompts, n):
    return [[(sum(p) + j) % 97 for j in range(n)] for p in prompts]


def test_serve_generate_reads_tokens_and_logprobs(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "ok")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert out["ok"], out
    assert [r["tokens"] for r in out["results"]] == _expected(PROMPTS, 4)
    assert out["results"][1]["top0"] == {str(103 % 97): -0.25, "1": -2.0}
    assert out["kernels"] == ["MacheteLinearKernel"]
    assert out["startup_s"] >= 0.5
    assert "--enforce-eager" in out["cmd"] and f"--config {ckpt / 'vllm_config.yaml'}" in out["cmd"]
    assert _gone(ckpt / "pid")  # the server was stopped


@pytest.mark.parametrize("mode, msg", [("drop", "/v1/completions: "), ("garbage", "/v1/completions: JSONDecodeError"),
                                       ("badstatus", "/v1/completions: BadStatusLine")])
def test_serve_generate_turns_a_broken_answer_into_an_error(tmp_path, mode, msg):
    ckpt, prefix = _ckpt(tmp_path, mode)
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and out["error"].startswith(msg) and out["results"] == [], out
    assert out["kernels"] == ["MacheteLinearKernel"] and _gone(ckpt / "pid")


def test_serve_generate_starts_again_when_the_port_was_taken(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "busy")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert (ckpt / "tried").exists() and out["ok"] and out["attempts"] == 2, out
    assert out["retried_after"] == ["vllm serve exited with status 1 before /health answered"]
    assert [r["tokens"] for r in out["results"]] == _expected(PROMPTS, 4)
    log = (tmp_path / "serve.log").read_text()  # both attempts are in the log
    assert log.count("--- pack_vllm_check: attempt") == 2 and "address already in use" in log
    assert "a line of the attempt that failed" in log and out["plugin_lines"] == []  # only the last attempt's
    (ckpt / "tried").unlink()
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix, attempts=1)
    assert not out["ok"] and "exited with status 1" in out["error"] and out["attempts"] == 1


def test_serve_generate_without_logprobs_compares_tokens_only(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "nologprobs")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert out["ok"] and all(r["top0"] == {} for r in out["results"]), out
    ref = [{"tokens": t, "top0": {str(t[0]): -0.1}} for t in _expected(PROMPTS, 4)]
    c = pvc._compare(ref, out["results"])
    assert c["identical_prompts"] == 3 and c["step0_compared"] == 0 and c["step0_top1_agree"] == 0


def test_serve_generate_reports_a_server_that_dies(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "die")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "exited with status 3" in out["error"]


def test_serve_generate_rejects_short_answers(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "short")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "prompts without exactly 4 token ids: [0, 1, 2]" in out["error"]
    assert _gone(ckpt / "pid")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups")
def test_serve_generate_times_out_and_stops_the_server(tmp_path):
    ckpt, _ = _ckpt(tmp_path, "ok")
    hang = tmp_path / "hang.py"  # never answers /health and ignores SIGINT: only the SIGKILL stops it
    hang.write_text(f"import os, signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                    f"open({str(tmp_path / 'hang.pid')!r}, 'w').write(str(os.getpid()))\n"
                    "while True: time.sleep(1)\n")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=2,
                             cmd_prefix=[sys.executable, str(hang)], grace=1)
    assert not out["ok"] and "did not answer within 2 s" in out["error"]
    assert _gone(tmp_path / "hang.pid")


def test_serve_generate_needs_a_tokenizer(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "ok")
    (ckpt / "tokenizer.json").unlink()
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "has no tokenizer" in out["error"] and out["cmd"] is None


HANG = """import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
open(sys.argv[-1], "w").write(str(os.getpid()))
while True: time.sleep(1)
"""


def test_sigterm_to_the_driver_stops_the_server(tmp_path):
    """The server runs in a session of its own, which a SIGTERM to the driver's process group (``timeout``) does
    not reach: the driver's handler must stop it (here a server that ignores SIGINT: SIGKILL after the grace)."""
    import signal
    import subprocess
    import time

    ckpt, _ = _ckpt(tmp_path, "ok")
    (tmp_path / "hang.py").write_text(HANG)
    pid_file = tmp_path / "hang.pid"
    driver = textwrap.dedent(f"""
        import signal, sys
        from pathlib import Path
        from bench.gpu import pack_vllm_check as pvc
        signal.signal(signal.SIGTERM, pvc._on_sigterm)  # what main() installs with --serve
        pvc.serve_generate(Path({str(ckpt)!r}), [[1]], 2, Path({str(tmp_path / 'serve.log')!r}), timeout=300,
                           cmd_prefix=[sys.executable, {str(tmp_path / 'hang.py')!r}],
                           extra=({str(pid_file)!r},))
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=pvc.REPO)
    try:
        t0 = time.time()
        while not (pid_file.exists() and pid_file.read_text()) and time.time() - t0 < 60:
            time.sleep(0.1)
        assert pid_file.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert _gone(pid_file)
    finally:  # whatever failed above: leave nothing running
        proc.kill()
        if pid_file.exists() and pid_file.read_text():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stub_driver(monkeypatch, tmp_path, offline_tokens, cuda_differs=False):
    """main()'s collaborators replaced: quantizing copies the checkpoint (adding the card files the serve step
    needs; with ``cuda_differs`` the --device cuda copy's model.safetensors has its last byte changed), the HF /
    offline-vLLM workers answer from the stand-in's token rule, and the server is the stand-in."""
    import functools
    import shutil

    def quantize(src, dst, device):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        (dst / "vllm_config.yaml").write_text('dtype: "bfloat16"\n')
        (dst / "mode").write_text("ok")
        if cuda_differs and device == "cuda":
            data = bytearray((dst / "model.safetensors").read_bytes())
            data[-1] ^= 1
            (dst / "model.safetensors").write_bytes(bytes(data))

    def spawn(kind, spec, work, name, env=None):
        toks = offline_tokens(spec["prompts"], spec["new_tokens"])
        res = [{"tokens": t, "top0": {str(t[0]): -0.1}} for t in toks]
        return ({"results": res, "startup_s": 1.0, "parsed_yaml": {}} if kind == "vllm" else {"results": res}), "", 0.1

    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE)
    handlers = []
    real = functools.partial(pvc.serve_generate, cmd_prefix=[sys.executable, str(fake)])

    def serve(*a, **kw):  # records the SIGTERM handler main() has installed while the server runs
        import signal

        handlers.append(signal.getsignal(signal.SIGTERM))
        return real(*a, **kw)
    monkeypatch.setattr(pvc, "_quantize", quantize)
    monkeypatch.setattr(pvc, "_spawn", spawn)
    monkeypatch.setattr(pvc, "serve_generate", serve)
    return handlers


def test_driver_reports_a_serve_failure_in_its_json(monkeypatch, tmp_path):
    """--scales (random checkpoints have no tokenizer): the serve step fails with its reason in the JSON; the rest
    of the report is still written."""
    import json

    import signal

    before = signal.getsignal(signal.SIGTERM)
    handlers = _stub_driver(monkeypatch, tmp_path, _expected)
    rc = pvc.main(["--scales", "micro", "--serve", "--prompts", "2", "--new-tokens", "3", "--out", str(tmp_path / "o")])
    rep = json.loads((tmp_path / "o" / "pack_vllm_check.json").read_text())
    assert rc == 1 and any("has no tokenizer" in f for f in rep["failures"]), rep["failures"]
    e = rep["checkpoints"]["micro"]
    assert e["vllm_serve"]["ok"] is False and e["vllm_marlin"]["vs_hf"]
    # the stub's two quantized copies are the same bytes: reported identical, no failure for it (the other side
    # of the comparison: test_driver_reports_cpu_cuda_outputs_that_differ)
    assert e["cpu_cuda_identical"] is True and not any("outputs differ" in f for f in rep["failures"])
    # main stops a running server on SIGTERM, and gives the handler back when it returns
    assert handlers == [pvc._on_sigterm] and signal.getsignal(signal.SIGTERM) is before


def test_driver_reports_cpu_cuda_outputs_that_differ(monkeypatch, tmp_path):
    """One byte of the --device cuda output differs from the --device cpu output: reported in the entry and as a
    failure (exit status 1)."""
    import json

    _stub_driver(monkeypatch, tmp_path, _expected, cuda_differs=True)
    rc = pvc.main(["--scales", "micro", "--serve", "--prompts", "2", "--new-tokens", "3",
                   "--out", str(tmp_path / "o")])
    rep = json.loads((tmp_path / "o" / "pack_vllm_check.json").read_text())
    assert rc == 1 and rep["checkpoints"]["micro"]["cpu_cuda_identical"] is False
    assert "micro: --device cpu and --device cuda outputs differ" in rep["failures"], rep["failures"]


def _stub_driver_with_tokenizer(monkeypatch, tmp_path):
    """_stub_driver whose offline engines differ from the stand-in server on prompt 0, and whose random checkpoints
    carry a tokenizer file (vllm serve needs one)."""
    def offline(prompts, n):
        toks = _expected(prompts, n)
        toks[0] = [t + 1 for t in toks[0]]
        return toks

    _stub_driver(monkeypatch, tmp_path, offline)
    from bench.factory import save_random_checkpoint

    def save_with_tokenizer(name, base, **kw):
        save_random_checkpoint(name, base, **kw)
        (base / "tokenizer.json").write_text("{}")
    monkeypatch.setattr("bench.factory.save_random_checkpoint", save_with_tokenizer)  # main imports it per call


def test_driver_compares_served_tokens_with_the_offline_engine(monkeypatch, tmp_path):
    """The served tokens against the offline default engine's: prompt 0 made to differ offline, so 1 of 2."""
    import json

    _stub_driver_with_tokenizer(monkeypatch, tmp_path)
    rc = pvc.main(["--scales", "micro", "--serve", "--prompts", "2", "--new-tokens", "3", "--out", str(tmp_path / "o")])
    rep = json.loads((tmp_path / "o" / "pack_vllm_check.json").read_text())
    assert rc == 0, rep["failures"]
    srv = rep["checkpoints"]["micro"]["vllm_serve"]
    assert srv["ok"] and srv["kernels"] == ["MacheteLinearKernel"]
    assert srv["identical_to_offline_default"] == 1 and srv["vs_hf"]["identical_prompts"] == 1


def test_serve_env_per_kernel(tmp_path, monkeypatch):
    """default: only a fresh compile cache of its own; marlin: Marlin forced; fast/exact: PDQKIT_VLLM_KERNEL and a
    PYTHONPATH on which vLLM's plugin discovery (importlib.metadata entry points) finds pdqkit's plugin."""
    import subprocess

    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    stale = tmp_path / "vllm_cache" / "serve-default" / "old"
    stale.mkdir(parents=True)
    assert pvc.serve_env("default", tmp_path) == {"VLLM_CACHE_ROOT": str(stale.parent)}
    assert not stale.parent.exists()  # an earlier server's compiled graphs are not reused
    marlin = pvc.serve_env("marlin", tmp_path)
    from bench.gpu.vllm_e2e_check import MARLIN_ONLY

    assert marlin["VLLM_DISABLED_KERNELS"] == MARLIN_ONLY and "PDQKIT_VLLM_KERNEL" not in marlin
    probe = ("from importlib.metadata import entry_points; "
             "print([e.value for e in entry_points(group='vllm.general_plugins')])")
    for kernel in ("fast", "exact"):
        env = pvc.serve_env(kernel, tmp_path)
        assert env["PDQKIT_VLLM_KERNEL"] == kernel and env["PYTHONPATH"].endswith(os.pathsep + "/somewhere")
        assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm_cache" / f"serve-{kernel}")
        r = subprocess.run([sys.executable, "-S", "-c", probe], env={"PYTHONPATH": env["PYTHONPATH"]},
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert "kernels.vllm_plugin:register" in r.stdout, r.stdout + r.stderr
    with pytest.raises(ValueError, match="unknown serve kernel 'slow'"):
        pvc.serve_env("slow", tmp_path)


def test_serve_generate_scrubs_inherited_kernel_settings(tmp_path, monkeypatch):
    """Kernel-choice and Inductor-numerics variables of the caller's shell never reach the server; env_extra does."""
    ckpt, prefix = _ckpt(tmp_path, "ok")
    for var in ("PDQKIT_VLLM_KERNEL", "VLLM_DISABLED_KERNELS", "VLLM_MARLIN_USE_ATOMIC_ADD",
                "TORCHINDUCTOR_DETERMINISTIC"):
        monkeypatch.setenv(var, "1")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert out["ok"] and out["plugin_lines"] == []  # the stand-in logs a plugin line iff PDQKIT_VLLM_KERNEL is set
    seen = json.loads((ckpt / "env.json").read_text())
    assert not {"PDQKIT_VLLM_KERNEL", "VLLM_DISABLED_KERNELS", "VLLM_MARLIN_USE_ATOMIC_ADD",
                "TORCHINDUCTOR_DETERMINISTIC"} & set(seen)
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve2.log", timeout=60, cmd_prefix=prefix,
                             env_extra={"VLLM_DISABLED_KERNELS": "X"})
    assert out["ok"] and json.loads((ckpt / "env.json").read_text())["VLLM_DISABLED_KERNELS"] == "X"


def test_serve_generate_passes_the_plugin_environment(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "ok")
    extra = tuple(a for a in pvc.SERVE_TEST_ARGS if a != "--enforce-eager")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix, extra=extra,
                             env_extra=pvc.serve_env("exact", tmp_path))
    assert out["ok"], out
    first, hint = out["plugin_lines"]
    assert first == "INFO pdqkit: PDQKIT_VLLM_KERNEL=exact, PdqkitExactLinearKernel registered first"
    assert hint.startswith("(EngineCore pid=7) INFO pdqkit: hint xx") and len(hint) == 400
    assert "--enforce-eager" not in out["cmd"]
    plain = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve2.log", timeout=60, cmd_prefix=prefix)
    assert plain["ok"] and plain["plugin_lines"] == []


def test_driver_serves_each_kernel_in_graph_mode(monkeypatch, tmp_path):
    """--serve-kernels default,exact --serve-mode graph --engines marlin: one server per kernel without
    --enforce-eager; both servers are compared with the offline Marlin engine (the only one that ran; prompt 0
    made to differ offline) and the exact server's plugin line is reported."""
    import json

    _stub_driver_with_tokenizer(monkeypatch, tmp_path)
    rc = pvc.main(["--scales", "micro", "--serve", "--serve-mode", "graph", "--serve-kernels", "default,exact",
                   "--engines", "marlin", "--prompts", "2", "--new-tokens", "3", "--out", str(tmp_path / "o")])
    rep = json.loads((tmp_path / "o" / "pack_vllm_check.json").read_text())
    assert rc == 0, rep["failures"]
    e = rep["checkpoints"]["micro"]
    assert "vllm_default" not in e and "vllm_marlin" in e
    d, x = e["vllm_serve"], e["vllm_serve-exact"]
    assert d["ok"] and x["ok"] and d["mode"] == x["mode"] == "graph"
    assert "--enforce-eager" not in d["cmd"] and "--enforce-eager" not in x["cmd"]
    assert d["offline_reference"] == x["offline_reference"] == "marlin"  # no offline default engine ran
    assert d["identical_to_offline_marlin"] == x["identical_to_offline_marlin"] == 1
    assert x["vs_hf"]["identical_prompts"] == 1
    assert d["plugin_lines"] == [] and "PDQKIT_VLLM_KERNEL=exact" in x["plugin_lines"][0]
    assert (tmp_path / "o" / "micro-vllm-serve-exact.log").is_file()


def test_driver_option_lists_checked(capsys):
    for argv, msg in ((["--serve-kernels", "default,slow"], "distinct kernels of default,marlin,fast,exact"),
                      (["--serve-kernels", "exact,exact"], "distinct kernels"),
                      (["--engines", "marlin,gpu"], "distinct engines of marlin,default,bf16")):
        with pytest.raises(SystemExit):
            pvc.main(argv)
        assert msg in capsys.readouterr().err


def test_engine_env_shares_the_kernel_choice(tmp_path, monkeypatch):
    """vllm_e2e_check.engine_env (offline engines) and serve_env (servers) choose kernels through one kernel_env;
    inherited kernel / Inductor settings are dropped unless asked for."""
    from bench.gpu import vllm_e2e_check as vec

    monkeypatch.setenv("PDQKIT_VLLM_KERNEL", "fast")
    monkeypatch.setenv("TORCHINDUCTOR_DETERMINISTIC", "1")
    monkeypatch.setenv("VLLM_MARLIN_INPUT_DTYPE", "fp8")
    m = vec.engine_env("marlin", tmp_path, "t")
    assert m["VLLM_DISABLED_KERNELS"] == vec.MARLIN_ONLY
    assert not {"PDQKIT_VLLM_KERNEL", "TORCHINDUCTOR_DETERMINISTIC", "VLLM_MARLIN_INPUT_DTYPE"} & set(m)
    x = vec.engine_env("exact", tmp_path, "t", deterministic_inductor=True)
    assert x["PDQKIT_VLLM_KERNEL"] == "exact" and x["TORCHINDUCTOR_DETERMINISTIC"] == "1"
    assert "VLLM_DISABLED_KERNELS" not in x and x["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm_cache" / "t")
    assert x["PYTHONPATH"].split(os.pathsep)[:len(vec.plugin_pythonpath(tmp_path))] == vec.plugin_pythonpath(tmp_path)
    d = vec.engine_env("default", tmp_path, "t")
    assert not {"PDQKIT_VLLM_KERNEL", "VLLM_DISABLED_KERNELS", "TORCHINDUCTOR_DETERMINISTIC"} & set(d)
    # the fast kernel's table is never inherited, only given; pdqkit engines count their launches
    monkeypatch.setenv("PDQKIT_W4A16_TABLE", "/somewhere/else.json")
    f = vec.engine_env("fast", tmp_path, "t")
    assert f["PDQKIT_W4A16_CENSUS"] == "1" and "PDQKIT_W4A16_TABLE" not in f
    f = vec.engine_env("fast", tmp_path, "t", table=Path("mine.json"))
    assert f["PDQKIT_W4A16_TABLE"] == str(Path("mine.json").absolute())
    m = vec.engine_env("marlin", tmp_path, "t", table=Path("mine.json"))
    assert not {"PDQKIT_W4A16_TABLE", "PDQKIT_W4A16_CENSUS"} & set(m)
    with pytest.raises(ValueError, match="unknown kernel 'slow'"):
        vec.engine_env("slow", tmp_path, "t")


def test_offline_engines_get_the_scrubbed_environment(monkeypatch, tmp_path):
    """_spawn (HF and the offline vLLM engines) starts from the same scrubbed environment as the servers, so an
    inherited kernel or Inductor setting cannot make the reference engine differ from the server it is compared
    with; the Marlin engine gets kernel_env's Marlin setting."""
    import subprocess as sp

    seen = []

    def fake_run(cmd, cwd=None, env=None, **kw):
        seen.append(env)
        return sp.CompletedProcess(cmd, 1)
    monkeypatch.setattr(pvc.subprocess, "run", fake_run)
    for var in ("VLLM_MARLIN_USE_ATOMIC_ADD", "TORCHINDUCTOR_DETERMINISTIC", "PDQKIT_VLLM_KERNEL"):
        monkeypatch.setenv(var, "1")
    from bench.gpu.vllm_e2e_check import MARLIN_ONLY, kernel_env

    res, _, _ = pvc._spawn("vllm", {"prompts": []}, tmp_path, "x", kernel_env("marlin", tmp_path))
    assert res is None and seen[0]["VLLM_DISABLED_KERNELS"] == MARLIN_ONLY
    assert not {"VLLM_MARLIN_USE_ATOMIC_ADD", "TORCHINDUCTOR_DETERMINISTIC", "PDQKIT_VLLM_KERNEL"} & set(seen[0])
