"""Phase 1's optional data cross-entropy term (``--ce-weight``) against direct references (CPU, fast): the chunked
loss against full-logit ``F.cross_entropy`` (autograd, fused and compiled paths, value-only path), the training
module against transformers' own causal-LM loss, and the run's log and lineage."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.__main__ import main as distill_main
from distill.config import DistillConfig
from distill.losses import chunked_logit_loss, forward_kl, per_token_loss_fn, softcap
from distill.models import DistillModule, load_model, set_trainable
from distill.toy import save_pair
from pack.checkpoint import read_lineage
from tests.distill_fixtures import aot_eager_compile  # noqa: F401 (a fixture)

torch.set_num_threads(1)


def _case(seed=0, N=70, d=16, V=300):
    g = torch.Generator().manual_seed(seed)
    h_s, w_s = torch.randn(N, d, generator=g), 0.5 * torch.randn(V, d, generator=g)
    h_t, w_t = torch.randn(N, d, generator=g), 0.5 * torch.randn(V, d, generator=g)
    wts = torch.rand(N, generator=g) / N
    labels = torch.randint(0, V, (N,), generator=g)
    w_ce = 0.3 * torch.rand(N, generator=g) / N
    w_ce[::7] = 0.0  # rows without a label
    return h_s, w_s, h_t, w_t, wts, labels, w_ce


def _reference(h_s, w_s, h_t, w_t, wts, labels, w_ce, T, cap):
    """Full logits in float64: sum w * T^2 KL + sum w_ce * F.cross_entropy (temperature 1)."""
    z_s = softcap(h_s.double() @ w_s.double().T, cap)
    z_t = softcap(h_t.double() @ w_t.double().T, cap)
    kl = (forward_kl(z_s, z_t, T) * wts.double()).sum()
    ce = (F.cross_entropy(z_s, labels, reduction="none") * w_ce.double()).sum()
    return kl, ce


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-30)
    assert (a.double() - b.double()).abs().max() <= rtol * scale, float((a.double() - b.double()).abs().max() / scale)


@pytest.mark.parametrize("impl", ["autograd", "fused"])
@pytest.mark.parametrize("T,cap,chunk", [(1.0, 30.0, 8), (2.0, 30.0, 100), (0.7, None, 1)])
def test_chunked_ce_equals_full_logit_reference(impl, T, cap, chunk):
    h_s, w_s, h_t, w_t, wts, labels, w_ce = _case()
    a_h, a_w = h_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
    kl, ce = _reference(a_h, a_w, h_t, w_t, wts, labels, w_ce, T, cap)
    (2.5 * (kl + ce)).backward()
    b_h, b_w = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    stats = {}
    got = chunked_logit_loss(b_h, b_w, h_t, w_t, wts, per_token_loss_fn("forward_kl", temperature=T), cap=cap,
                             chunk=chunk, impl=impl, labels=labels, ce_weights=w_ce, stats=stats)
    (2.5 * got).backward()
    _close(got, (kl + ce).detach(), 1e-5)
    _close(stats["logit"], kl.detach(), 1e-5)
    _close(stats["ce"], ce.detach(), 1e-5)
    assert float(ce.detach()) > 0.1 * float(kl.detach())  # the CE term is not negligible in this case: the checks below can fail
    _close(b_h.grad, a_h.grad, 1e-4)
    _close(b_w.grad, a_w.grad, 1e-4)


def test_ce_weights_zero_is_the_kl_alone_and_value_path_agrees():
    h_s, w_s, h_t, w_t, wts, labels, w_ce = _case(seed=1)
    fn = per_token_loss_fn("forward_kl")
    h0, h1 = h_s.clone().requires_grad_(True), h_s.clone().requires_grad_(True)
    plain = chunked_logit_loss(h0, w_s, h_t, w_t, wts, fn, cap=30.0, chunk=9)
    zero = chunked_logit_loss(h1, w_s, h_t, w_t, wts, fn, cap=30.0, chunk=9, labels=labels,
                              ce_weights=torch.zeros_like(w_ce))
    plain.backward()
    zero.backward()
    assert torch.equal(plain, zero) and torch.equal(h0.grad, h1.grad)
    kl, ce = _reference(h_s, w_s, h_t, w_t, wts, labels, w_ce, 1.0, 30.0)
    stats = {}
    with torch.no_grad():
        got = chunked_logit_loss(h_s, w_s, h_t, w_t, wts, fn, cap=30.0, chunk=9, labels=labels, ce_weights=w_ce,
                                 stats=stats)
    _close(got, kl + ce, 1e-5)
    _close(stats["ce"], ce, 1e-5)
    with pytest.raises(ValueError, match="together"):
        chunked_logit_loss(h_s, w_s, h_t, w_t, wts, fn, cap=None, labels=labels)
    with pytest.raises(ValueError, match="int64"):
        chunked_logit_loss(h_s, w_s, h_t, w_t, wts, fn, cap=None, labels=labels.int(), ce_weights=w_ce)


@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_compiled_ce_equals_eager(aot_eager_compile, impl):
    _, graphs = aot_eager_compile
    h_s, w_s, h_t, w_t, wts, labels, w_ce = _case(seed=2)
    fn = per_token_loss_fn("forward_kl", temperature=1.5)
    out = []
    for compile in (False, True):
        h = h_s.clone().requires_grad_(True)
        loss = chunked_logit_loss(h, w_s, h_t, w_t, wts, fn, cap=30.0, chunk=32, impl=impl, compile=compile,
                                  labels=labels, ce_weights=w_ce)
        loss.backward()
        out.append((loss.detach(), h.grad))
    # Dynamo captured the CE part (its gather) into a graph: the compiled run did not fall back to eager
    assert any("gather" in str(g.graph) for g in graphs), "compile=True did not compile the CE term"
    _close(out[1][0], out[0][0], 1e-5)
    _close(out[1][1], out[0][1], 1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ce_pair")
    teacher, student = save_pair(root, "micro", width=512)
    return teacher, student, root


def test_module_ce_is_transformers_causal_lm_loss(pair):
    """DistillModule's data CE equals ``student(input_ids, labels=input_ids).loss`` (transformers shifts the labels
    and averages over the B*(S-1) labelled positions), and its loss and gradients equal KL + w * that loss."""
    teacher_dir, student_dir, _ = pair
    t = load_model(teacher_dir, torch.float32)
    ids = torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    n, w = ids.numel(), 0.4
    with torch.no_grad():
        t_last = t.get_decoder()(input_ids=ids).last_hidden_state
        t_logits = t(input_ids=ids).logits

    ref_s = load_model(student_dir, torch.float32)
    set_trainable(ref_s)
    out = ref_s(input_ids=ids, labels=ids)
    kl = forward_kl(out.logits.reshape(n, -1), t_logits.reshape(n, -1), 2.0).mean()
    (kl + w * out.loss).backward()
    ref_g = {k: p.grad for k, p in ref_s.named_parameters() if p.requires_grad}

    for impl in ("autograd", "fused"):
        s = load_model(student_dir, torch.float32)
        set_trainable(s)
        dm = DistillModule(s, logit_loss="forward_kl", temperature=2.0, beta=0.5, logit_weight=1.0, hidden_layers=[],
                           hidden_weights=[], chunk=11, compute_dtype=torch.float32, loss_impl=impl, ce_weight=w)
        loss, parts = dm(ids, teacher_last=t_last, teacher_head=t.get_output_embeddings().weight,
                         rows=torch.arange(n), row_weights=torch.full((n,), 1.0 / n))
        loss.backward()
        torch.testing.assert_close(parts["data_ce"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts["forward_kl"], kl.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss.detach(), (kl + w * out.loss).detach(), rtol=1e-5, atol=1e-7)
        g = {k: p.grad for k, p in s.named_parameters() if p.requires_grad}
        assert set(g) == set(ref_g)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-5 * float(ref_g[k].abs().max()) + 1e-12,
                                       msg=k)


def test_run_logs_data_ce_and_lineage(pair, tmp_path):
    teacher, student, root = pair
    data = root / "ids.jsonl"
    g = torch.Generator().manual_seed(5)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(4, 2048, (96,), generator=g).tolist()}) + "\n"
                            for _ in range(6)))
    out = tmp_path / "o"
    log = tmp_path / "log.jsonl"
    assert distill_main(["--teacher", str(teacher), "--student", str(student), "-o", str(out), "--data", str(data),
                         "--threads", "1", "--steps", "3", "--batch", "2", "--seq-len", "32", "--ce-weight", "0.5",
                         "--log-every", "1", "--log-json", str(log)]) == 0
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "step"]
    for r in steps:  # the logged total is KL + 0.5 CE + hidden
        assert r["data_ce"] > 1.0
        assert r["loss"] == pytest.approx(r["forward_kl"] + 0.5 * r["data_ce"] + r["hidden_mse"], rel=1e-5)
    step = read_lineage(out)[-1]
    assert step["losses"]["data_ce"]["weight"] == 0.5
    assert "data_ce" in step["loss_last10"]


def test_ce_weight_refused_in_phase2_and_negative():
    with pytest.raises(ValueError, match="--ce-weight is a phase-1 term"):
        DistillConfig(teacher="t", student="s", out="o", phase=2, ce_weight=0.1)
    with pytest.raises(ValueError, match="--ce-weight -1"):
        DistillConfig(teacher="t", student="s", out="o", ce_weight=-1.0)
    assert "ce_weight" in DistillConfig(teacher="t", student="s", out="o").result_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "autograd"])
def test_cuda_bf16_compiled_ce_matches_reference(impl):
    """On the GPU, as phase 1 runs there (bf16 matmuls, Inductor-compiled chunk math): value and gradient of KL +
    data CE against the float64 full-logit reference on the same bf16-rounded inputs."""
    torch._dynamo.reset()
    h_s, w_s, h_t, w_t, wts, labels, w_ce = _case(seed=4, N=300, d=64, V=4096)
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    h_s, w_s, h_t, w_t = bf(h_s), bf(w_s), bf(h_t), bf(w_t)
    a_h = h_s.double().requires_grad_(True)
    kl, ce = _reference(a_h, w_s.double(), h_t.double(), w_t.double(), wts, labels, w_ce, 1.5, 30.0)
    (kl + ce).backward()
    dev = torch.device("cuda")
    b_h = h_s.to(dev).requires_grad_(True)
    stats = {}
    got = chunked_logit_loss(b_h, w_s.to(dev), h_t.to(dev), w_t.to(dev), wts.to(dev),
                             per_token_loss_fn("forward_kl", temperature=1.5), cap=30.0, chunk=128, impl=impl,
                             compile=True, labels=labels.to(dev), ce_weights=w_ce.to(dev), stats=stats)
    got.backward()
    # bf16 logits (the matmul's output dtype) and a bf16 dgrad (the same run on the CPU, uncompiled: 4e-5 on the
    # value, 7.5e-3 on the gradient)
    _close(got.cpu(), (kl + ce).detach(), 1e-3)
    _close(stats["ce"].cpu(), ce.detach(), 1e-3)
    _close(b_h.grad.float().cpu(), a_h.grad, 3e-2)
