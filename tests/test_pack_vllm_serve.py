"""CPU tests of the `vllm serve` client in bench/gpu/pack_vllm_check.py (``serve_generate``).

The real server runs on the GPU machine only; here a stand-in HTTP server (stdlib ``http.server``) takes its
place on the command line. It answers like vLLM 0.26.0's OpenAI server does for the fields the client reads
(``/health``; ``/v1/completions`` with ``return_token_ids`` and ``return_tokens_as_token_ids`` log-probs), with
tokens computed from each prompt by a rule the test checks independently.
"""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

from bench.gpu import pack_vllm_check as pvc

FAKE = textwrap.dedent('''
    import json, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from pathlib import Path

    args = sys.argv[1:]
    assert args[0] == "serve", args
    ckpt, opts = Path(args[1]), args[2:]
    get = lambda k: opts[opts.index(k) + 1]
    assert Path(get("--config")) == ckpt / "vllm_config.yaml" and Path(get("--config")).is_file()
    mode = (ckpt / "mode").read_text().strip()
    if mode == "die":
        sys.exit(3)
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
            assert req["model"] == get("--served-model-name") and req["temperature"] == 0.0
            assert req["return_token_ids"] and req["return_tokens_as_token_ids"] and req["ignore_eos"]
            n = req["max_tokens"] - (mode == "short")
            choices = [{"index": i, "text": "",
                        "token_ids": [(sum(p) + j) % 97 for j in range(n)],
                        "logprobs": {"top_logprobs": [{f"token_id:{sum(p) % 97}": -0.25, "token_id:1": -2.0}]}}
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


def test_serve_generate_reads_tokens_and_logprobs(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "ok")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert out["ok"], out
    assert [r["tokens"] for r in out["results"]] == [[(sum(p) + j) % 97 for j in range(4)] for p in PROMPTS]
    assert out["results"][1]["top0"] == {str(103 % 97): -0.25, "1": -2.0}
    assert out["kernels"] == ["MacheteLinearKernel"]
    assert out["startup_s"] >= 0.5
    assert "--enforce-eager" in out["cmd"] and f"--config {ckpt / 'vllm_config.yaml'}" in out["cmd"]
    # the comparison the driver makes against HF / the offline engine uses the same rows
    same = pvc._compare(out["results"], out["results"])
    assert same["identical_prompts"] == len(PROMPTS) and same["step0_top1_agree"] == len(PROMPTS)


def test_serve_generate_reports_a_server_that_dies(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "die")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "exited with status 3" in out["error"]


def test_serve_generate_rejects_short_answers(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "short")
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "fewer than 4 token ids" in out["error"]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups")
def test_serve_generate_times_out_and_stops_the_server(tmp_path):
    ckpt, _ = _ckpt(tmp_path, "ok")
    hang = tmp_path / "hang.py"
    hang.write_text("import time\nwhile True: time.sleep(1)\n")  # never answers /health, ignores nothing
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=2,
                             cmd_prefix=[sys.executable, str(hang)])
    assert not out["ok"] and "did not answer within 2 s" in out["error"]


def test_serve_generate_needs_a_tokenizer(tmp_path):
    ckpt, prefix = _ckpt(tmp_path, "ok")
    (ckpt / "tokenizer.json").unlink()
    out = pvc.serve_generate(ckpt, PROMPTS, 4, tmp_path / "serve.log", timeout=60, cmd_prefix=prefix)
    assert not out["ok"] and "has no tokenizer" in out["error"] and out["cmd"] is None
