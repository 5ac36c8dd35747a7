"""Mutation audit of distill's guards, boundaries and small pure functions (models, data, sample, select, the
testable parts of train, losses): each test pins one line that no other test would notice being changed (a
comparison's boundary, a field or branch dropped, a constant), against a computation made here independently.
CPU only, tiny models built from configs (module-scoped), no model hub."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import distill.parallel as parallel
from bench.factory import build_model, model_config
from distill.config import DistillConfig
from distill.data import TokenBlocks, _encode, load_blocks, pair_tokenizer
from distill.losses import chunked_logit_loss, generalized_jsd, hidden_state_loss, per_token_loss_fn
from distill.models import (DistillModule, MasterWeights, capture_layer_outputs, check_pair, limit_checkpointing,
                            matmul_params, set_trainable, to_bf16_layout)
from distill.parallel import DistEnv
from distill.sample import continuation_mask, on_policy_step, row_seed, sample_continuations
from distill.select import SelectConfig, check_use, read_meta
from distill.select import _device as select_device
from distill.train import (Distiller, _eos_ids, _Log, _no_usable_checkpoint, _prepare_output, _refuse_at_or_inside,
                           _summary, loss_parts, lr_at)

torch.set_num_threads(1)
CPU1 = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def micro():
    return build_model("micro", dtype=torch.float32)


@pytest.fixture(scope="module")
def micro_mm():
    return build_model("micro", multimodal=True, dtype=torch.float32)


def _holder(cfg):
    """A stand-in model for :func:`check_pair`, which reads only ``model.config``."""
    return SimpleNamespace(config=cfg)


# ============================================================== distill/models.py
PAIR_FIELDS = {"vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 4, "final_logit_softcapping": 50.0}


@pytest.mark.parametrize("multimodal", [False, True])
@pytest.mark.parametrize("field", sorted(PAIR_FIELDS))
def test_check_pair_refuses_each_differing_field_and_names_it(field, multimodal):
    """check_pair compares vocab_size, hidden_size, num_hidden_layers and final_logit_softcapping of the language
    configs (multimodal: through get_text_config): each, differing alone, is refused with a message naming the field,
    the student's and the teacher's values (mutation: a field dropped from the tuple, the comparison inverted)."""
    teacher = _holder(model_config("micro", multimodal))
    student = _holder(model_config("micro", multimodal, **{field: PAIR_FIELDS[field]}))
    t_val = getattr(model_config("micro"), field)
    assert t_val != PAIR_FIELDS[field]
    with pytest.raises(ValueError) as e:
        check_pair(teacher, student, "T-dir", "S-dir")
    msg = str(e.value)
    assert msg.startswith("S-dir: ") and f"student {field}={PAIR_FIELDS[field]}" in msg
    assert f"teacher T-dir {field}={t_val}" in msg
    check_pair(student, student, "S-dir", "S-dir")   # the same config on both sides passes


def test_check_pair_accepts_equal_configs_and_refuses_a_cap_on_one_side_only():
    """Equal language configs pass even when other fields (MLP width: a pruned student) or the wrapper (a text-only
    teacher, a multimodal student) differ; no softcap on one side and a softcap on the other is a difference."""
    check_pair(_holder(model_config("micro")), _holder(model_config("micro", True, intermediate_size=256)), "t", "s")
    with pytest.raises(ValueError, match="final_logit_softcapping=None"):
        check_pair(_holder(model_config("micro")), _holder(model_config("micro", final_logit_softcapping=None)),
                   "t", "s")


@pytest.mark.parametrize("multimodal", [False, True])
def test_matmul_params_equals_the_matmul_flops_of_a_forward(multimodal, micro, micro_mm):
    """matmul_params (MFU's N) = the weights that take part in a matmul for every token: measured independently as
    the mm FLOPs of one full forward (logits included) counted by torch's FlopCounterMode, / (2 x tokens). The
    multimodal towers do not run on token ids, the tied lm_head counts once (mutation: model.modules() instead of the
    decoder's, the lm_head term dropped)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = micro_mm if multimodal else micro
    ids = torch.randint(0, 2048, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids)
    mm = sum(v for op, v in fc.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    assert mm % (2 * ids.numel()) == 0
    assert matmul_params(model) == mm // (2 * ids.numel())
    assert matmul_params(model) < sum(p.numel() for p in model.parameters())


def test_set_trainable_selects_the_language_stack(micro_mm):
    """Default: every language-stack tensor but the two embedding tables; train_embeddings: those too; "mlp": the
    decoder layers' MLP weights only; the towers never. Names come back in named_parameters order (the reference
    here is built from the parameter names alone)."""
    names = [n for n, _ in micro_mm.named_parameters()]
    lang = [n for n in names if n.startswith("model.language_model.")]
    emb = [n for n in lang if n.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight"))]
    assert len(emb) == 2 and len(lang) < len(names)
    cases = [(dict(), [n for n in lang if n not in emb]), (dict(train_embeddings=True), lang),
             (dict(trainable="mlp"), [n for n in lang if ".layers." in n and ".mlp." in n])]
    try:
        for kw, want in cases:
            got = set_trainable(micro_mm, **kw)
            assert got == want, kw
            assert [n for n, p in micro_mm.named_parameters() if p.requires_grad] == want, kw
    finally:
        micro_mm.requires_grad_(False)


def test_set_trainable_refuses_a_stack_with_nothing_to_train():
    """A language stack whose only tensors are embedding tables (frozen by default) is refused, not trained with
    an empty optimizer (mutation: the guard removed)."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.Module()
            self.dec.embed_tokens = nn.Embedding(4, 2)
            self.dec.layers = nn.ModuleList()

        def get_decoder(self):
            return self.dec

    with pytest.raises(ValueError, match="no trainable parameters"):
        set_trainable(Stack())
    assert set_trainable(Stack(), train_embeddings=True) == ["dec.embed_tokens.weight"]


def test_to_bf16_layout_is_the_layout_a_bf16_load_gives():
    """An fp32 model cast in place has every parameter and buffer of a model built in bf16 from the same weights
    (bench.factory.build_model lays it out as from_pretrained(dtype=bf16) does): the same dtypes, the RoPE
    inv_freq buffers still fp32 and bit-equal, parameter identities and the lm_head tie kept (mutations: the
    inv_freq exclusion dropped, the buffer pass skipped)."""
    fp32 = build_model("micro", dtype=torch.float32)
    ref = build_model("micro", dtype=torch.bfloat16)
    ids = {n: id(p) for n, p in fp32.named_parameters()}
    assert to_bf16_layout(fp32) is fp32
    assert {n: id(p) for n, p in fp32.named_parameters()} == ids
    assert fp32.get_output_embeddings().weight is fp32.get_decoder().embed_tokens.weight
    got = {**dict(fp32.named_parameters()), **dict(fp32.named_buffers())}
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    assert set(got) == set(want)
    inv = [n for n in want if n.endswith("inv_freq")]
    assert inv and all(want[n].dtype == torch.float32 for n in inv)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and torch.equal(got[n], w), n


def test_master_weights_mirror_names_values_and_grads():
    """MasterWeights: fp32 copies registered under the model's dotted names, exact values of the bf16 params;
    grads_from_model moves each bf16 grad as fp32 (None stays None) and frees it; no parameters is refused."""
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    named = list(m.named_parameters())
    mw = MasterWeights(named)
    assert [n for n, _ in mw.named_parameters()] == [n for n, _ in named]
    for (n, p), master in zip(named, mw.masters):
        assert master.dtype == torch.float32 and torch.equal(master, p.float()), n
    m[0].weight.grad = torch.ones_like(m[0].weight) / 3
    want = m[0].weight.grad.float()
    mw.grads_from_model()
    assert torch.equal(mw.masters[0].grad, want) and m[0].weight.grad is None
    assert all(x.grad is None for x in mw.masters[1:])
    with pytest.raises(ValueError, match="no parameters given"):
        MasterWeights([])


def test_limit_checkpointing_clamps_to_the_depth():
    """N at or above the depth checkpoints every layer and reports the depth; None means all (mutation: the min
    with the layer count dropped)."""
    model = SimpleNamespace(get_decoder=lambda: dec)
    for n, want in ((99, 4), (4, 4), (None, 4), (2, 2), (0, 0)):
        dec = SimpleNamespace(layers=[SimpleNamespace(gradient_checkpointing=True) for _ in range(4)])
        assert limit_checkpointing(model, n) == want, n
        assert [x.gradient_checkpointing for x in dec.layers] == [True] * want + [False] * (4 - want), n


def test_capture_layer_outputs_records_only_inside_the_block():
    """Hooks record the chosen layers' outputs (a tuple's first element) inside the with-block and are gone after
    it (activation-checkpoint recomputation must not record again)."""
    layers = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity()])
    x = torch.arange(3.0)
    with capture_layer_outputs(layers, [0, 2]) as out:
        for layer in layers:
            layer(x)
    assert sorted(out) == [0, 2] and all(torch.equal(v, x) for v in out.values())
    out.clear()
    for layer in layers:
        layer(x)
    assert out == {} and all(not layer._forward_hooks for layer in layers)


def _module(ce_weight: float) -> DistillModule:
    return DistillModule(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=None)),
                         logit_loss="forward_kl", temperature=1.0, beta=0.5, logit_weight=1.0, hidden_layers=[],
                         hidden_weights=[], chunk=8, compute_dtype=torch.float32, ce_weight=ce_weight)


def test_data_labels_are_the_next_token_with_a_mean_over_labelled_rows():
    """Row b*S+s is labelled input_ids[b, s+1]; a sequence's last position has weight 0; the weights are
    ce_weight / (labelled rows among those scored), computed here by loops (mutation: the last position labelled,
    another normaliser). Only last positions: all weights 0, not NaN (the clamp_min)."""
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    S = ids.shape[1]
    rows = torch.tensor([0, 3, 4, 5, 9, 7])
    labels, w = _module(0.6)._data_labels(ids, rows)
    labelled = [int(r) % S < S - 1 for r in rows]
    for k, r in enumerate(rows.tolist()):
        b, s = divmod(r, S)
        if labelled[k]:
            assert labels[k] == ids[b, s + 1]
            assert w[k].item() == pytest.approx(0.6 / sum(labelled))
        else:
            assert w[k].item() == 0.0
    _, w_last = _module(0.6)._data_labels(ids, torch.tensor([4, 9]))
    assert torch.equal(w_last, torch.zeros(2))


# ============================================================== distill/data.py
@pytest.mark.parametrize("magic,what", [(b"\x1f\x8b\x08\x00", "gzip"), (b"(\xb5/\xfd", "zstd"),
                                        (b"BZh9", "bzip2"), (b"PK\x03\x04", "zip")])
def test_each_compressed_format_is_refused(tmp_path, magic, what):
    """Each of the four magic numbers (gzip, zstd, bzip2, zip) is refused as compressed, whatever the file's name
    (mutation: one of them dropped: its bytes would be read as text or JSON lines)."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(magic + b"\x00" * 200)
    with pytest.raises(ValueError, match="a compressed file"):
        load_blocks(str(f), None, 4, None, 2048)


def _ids_file(path: Path, *records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_token_id_bounds_are_zero_and_vocab_minus_one(tmp_path):
    """Ids 0 and vocab_size-1 are in the vocabulary; -1 and vocab_size are not, and the message names the bad id
    (mutation: lo < 0 -> lo < -1 / dropped, hi >= vocab -> hi > vocab)."""
    f = tmp_path / "d.jsonl"
    assert load_blocks(_ids_file(f, {"input_ids": [0, 5, 9, 0]}), None, 2, None, 10).blocks.tolist() == [[0, 5],
                                                                                                          [9, 0]]
    for bad, vocab in (([0, -1, 3, 4], 10), ([0, 10, 3, 4], 10)):
        with pytest.raises(ValueError, match=rf"token id {bad[1]} outside the models' vocabulary \[0, {vocab}\)"):
            load_blocks(_ids_file(f, {"input_ids": bad}), None, 2, None, vocab)


def test_one_window_needs_exactly_seq_len_tokens(tmp_path):
    """seq_len tokens make one window; seq_len - 1 make none and are refused with the count (boundary of n == 0)."""
    f = tmp_path / "d.jsonl"
    assert load_blocks(_ids_file(f, {"input_ids": [1, 2, 3]}), None, 3, None, 10).blocks.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="2 tokens, fewer than one window of --seq-len 3"):
        load_blocks(_ids_file(f, {"input_ids": [1, 2]}), None, 3, None, 10)


def test_jsonl_line_errors_name_the_line(tmp_path):
    """Blank lines are skipped; a line that is not JSON, or JSON that is not an object with text / input_ids, is
    refused naming its line number; a plain-text file without a tokenizer is refused; a missing file is named."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"input_ids": [1, 2]}\n\n   \n{"input_ids": [3, 4]}\n')
    assert load_blocks(str(f), None, 2, None, 10).blocks.tolist() == [[1, 2], [3, 4]]
    f.write_text('{"input_ids": [1, 2]}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not JSON"):
        load_blocks(str(f), None, 2, None, 10)
    for bad in ([1, 2], {"ids": [1]}, {"text": 5}, "x"):
        f.write_text('{"input_ids": [1, 2]}\n' + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"d\.jsonl:2: expected an object"):
            load_blocks(str(f), None, 2, None, 10)
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        load_blocks(str(tmp_path / "d.txt"), None, 2, None, 10)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_blocks(str(tmp_path / "missing.jsonl"), None, 2, None, 10)
    with pytest.raises(ValueError, match="default data .* needs a tokenizer"):
        load_blocks(None, None, 2, None, 10)


def _word_tokenizer(words, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "c"]


def test_encode_adds_only_the_special_tokens_the_tokenizer_has():
    """<bos> doc <eos> per document; a tokenizer without a bos (or eos) token adds nothing in its place (no None
    id in the stream)."""
    both = _word_tokenizer(WORDS, bos_token="<bos>", eos_token="<eos>")
    assert _encode(["a b", "c"], both) == [2, 4, 5, 1, 2, 6, 1]
    assert _encode(["a b", "c"], _word_tokenizer(WORDS, eos_token="<eos>")) == [4, 5, 1, 6, 1]
    assert _encode(["a b"], _word_tokenizer(WORDS, bos_token="<bos>")) == [2, 4, 5]


def test_pair_tokenizer_prefers_the_students_and_falls_back_to_the_teachers(tmp_path):
    """The data is encoded with the student's tokenizer, else the teacher's, else none (the reference: each
    tokenizer's own encoding of a text; mutation: the preference inverted)."""
    t, s, none = tmp_path / "t", tmp_path / "s", tmp_path / "none"
    for d in (t, s, none):
        d.mkdir()
    _word_tokenizer(WORDS).save_pretrained(t)
    _word_tokenizer(WORDS, padding_side="left").save_pretrained(s)   # the same backend, told apart by its side
    text = "a c"
    assert pair_tokenizer(s, t).padding_side == "left"
    assert pair_tokenizer(none, t)(text)["input_ids"] == _word_tokenizer(WORDS)(text)["input_ids"]
    assert pair_tokenizer(none, t).padding_side == "right"
    assert pair_tokenizer(s, none).padding_side == "left"
    assert pair_tokenizer(none, none) is None


def test_batch_of_a_rank_is_its_slice_of_the_global_batch():
    """Rank r of W takes rows r*B/W .. (r+1)*B/W-1 of the global batch (reference: one process's batch sliced)."""
    blocks = TokenBlocks(torch.arange(10).view(10, 1), "x", "0", None)
    for step in range(4):
        whole = blocks.batch(step, 6, seed=2)
        for r in range(3):
            assert torch.equal(blocks.batch(step, 6, r, 3, seed=2), whole[2 * r:2 * r + 2])


# ============================================================== distill/sample.py
def test_row_seed_is_63_bits_of_the_documented_sha256():
    """row_seed = the low 63 bits (little-endian, first 8 bytes) of sha256("salt/seed/step/row"): recomputed here;
    distinct rows, steps, seeds and salts give distinct seeds."""
    for args in ((0, 0, 0), (7, 3, 5), (2 ** 40, 10 ** 6, 123)):
        h = hashlib.sha256("gkd-sample/{}/{}/{}".format(*args).encode()).digest()
        assert row_seed(*args) == int.from_bytes(h[:8], "little") % 2 ** 63
    seeds = {row_seed(a, b, c) for a in range(3) for b in range(3) for c in range(3)}
    assert len(seeds) == 27 and max(seeds) < 2 ** 63
    assert row_seed(1, 2, 3) != row_seed(1, 2, 3, salt="other")


def test_on_policy_is_u_strictly_below_lambda():
    """Step s is on-policy iff its uniform u = row_seed(seed, s, -1, "gkd-lambda") / 2^63 is < lmbda: a lmbda equal
    to u is off-policy, the next float above u on-policy (the boundary of the comparison; lmbda = 0: never)."""
    for seed, step in ((0, 0), (3, 17), (5, 1000)):
        u = row_seed(seed, step, -1, salt="gkd-lambda") / float(1 << 63)
        assert 0 <= u < 1
        assert not on_policy_step(seed, step, u)
        assert on_policy_step(seed, step, math.nextafter(u, 2.0))
        assert not on_policy_step(seed, step, math.nextafter(u, -1.0))


def test_sampling_runs_one_decode_per_new_token():
    """max_new_tokens tokens cost exactly max_new_tokens decode calls (the prompt, then every token but the last):
    under FSDP every rank must run the same forwards, and an extra one is a wasted forward (mutation: t+1 <= n)."""
    calls = []

    def decode(ids, cache):
        calls.append(ids.shape)
        return torch.zeros(ids.shape[0], 5)

    for n in (1, 4):
        calls.clear()
        out = sample_continuations(decode, torch.zeros(2, 3, dtype=torch.long), n, 1.0, [1, 2], lambda: None)
        assert out.shape == (2, n) and calls == [(2, 3)] + [(2, 1)] * (n - 1)


# ============================================================== distill/select.py
def _meta(seq_len=32, kept=128, sha="abc"):
    return {"config": {"seq_len": seq_len}, "kept_tokens": kept, "jsonl_sha256": sha}


def test_check_use_boundaries():
    """--max-tokens equal to the selected tokens (or above, or unset) trains on all of them and passes; one below
    drops some and is refused; only the selection's own --seq-len is accepted (mutation: < -> <=)."""
    for max_tokens in (None, 128, 129):
        check_use(_meta(), "sel.jsonl", 32, max_tokens)
    with pytest.raises(ValueError, match="--max-tokens 127 drops part of the 128 selected tokens"):
        check_use(_meta(), "sel.jsonl", 32, 127)
    for seq_len in (31, 33):
        with pytest.raises(ValueError, match=f"--seq-len {seq_len} would splice"):
            check_use(_meta(), "sel.jsonl", seq_len, None)


def test_read_meta_none_match_and_refusals(tmp_path):
    """No sidecar: None; a sidecar naming this file's sha256: its dict; another sha256, a non-object or a missing
    key: refused as describing another file; garbage: unreadable."""
    data = tmp_path / "sel.jsonl"
    assert read_meta(data, "abc") is None
    side = tmp_path / "sel.jsonl.meta.json"
    side.write_text(json.dumps(_meta()))
    assert read_meta(data, "abc") == _meta()
    for body in (_meta(sha="abd"), [_meta()], {"config": {}}):
        side.write_text(json.dumps(body))
        with pytest.raises(ValueError, match="describes another file"):
            read_meta(data, "abc")
    side.write_text("{")
    with pytest.raises(ValueError, match="unreadable selection metadata"):
        read_meta(data, "abc")


SEL_OK = dict(teacher="t", student="s", out="o.jsonl", tokens=64, seq_len=32)


@pytest.mark.parametrize("kw,msg", [
    (dict(teacher=""), "are required"), (dict(student=""), "are required"), (dict(out=""), "are required"),
    *[(dict({n: 0}), f"--{n.replace('_', '-')} 0: must be a positive integer")
      for n in ("tokens", "seq_len", "batch_size", "chunk")],
    *[(dict({n: True}), f"--{n.replace('_', '-')} True: must be a positive integer")
      for n in ("batch_size", "chunk")],
    (dict(chunk=2.0), "--chunk 2.0: must be a positive integer"),
    (dict(tokens=31), "--tokens 31: keeps no window of --seq-len 32"),
    (dict(pool_tokens=63), "--pool-tokens 63: must be at least --tokens 64"),
    *[(dict(temperature=t), "must be a positive number") for t in (0.0, -1.0, math.inf, math.nan)],
    (dict(device="gpu"), "use auto, cpu, cuda or cuda:N"), (dict(out="o.json"), "the selection is a .jsonl file"),
])
def test_select_config_refuses_just_outside(kw, msg):
    """Each SelectConfig guard refuses the value just outside its range, naming the option."""
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        SelectConfig(**{**SEL_OK, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(tokens=32), dict(pool_tokens=64), dict(batch_size=1, chunk=1),
                                dict(temperature=1e-6), dict(device="cuda:1"), dict(device="cpu")])
def test_select_config_accepts_just_inside(kw):
    """The boundaries themselves are accepted: --tokens == --seq-len, --pool-tokens == --tokens, sizes of 1."""
    SelectConfig(**{**SEL_OK, **kw})


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:-1"])
def test_select_config_refuses_a_malformed_cuda_device(device):
    """python -m distill.select takes --device as python -m distill does (distill.config.check_device): cuda:N only.
    Before, any "cuda:..." passed, and on a CUDA machine select() then met torch.device("cuda:x")'s RuntimeError,
    which main() does not catch: a traceback instead of the one-line error (found by the forty-first session's
    audit)."""
    with pytest.raises(ValueError, match="--device"):
        DistillConfig(teacher="t", student="s", out="o", device=device)   # distill's own guard refuses it
    with pytest.raises(ValueError, match="--device"):
        SelectConfig(**{**SEL_OK, "device": device})


def test_select_device_resolution():
    """cpu is cpu; auto is cpu without CUDA; an explicit CUDA device without CUDA is a one-line ValueError."""
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                select_device(name)


# ============================================================== distill/losses.py
def _case(n=6, d=4, v=11):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randn(n, d, generator=g),
            torch.randn(v, d, generator=g), torch.full((n,), 1.0 / n))


def test_chunked_logit_loss_guards():
    """Every argument check of chunked_logit_loss refuses its bad input (not a broadcast or a crash deep inside):
    3-D hidden states (of the right row count), other row counts, weights of another length, another vocabulary,
    chunk 0 (chunk 1 is fine), labels without weights or the reverse, int32 labels, ce_weights of another length."""
    fn = per_token_loss_fn("forward_kl")
    h_s, w_s, h_t, w_t, w = _case()
    lab, cw = torch.zeros(6, dtype=torch.long), torch.full((6,), 0.5)
    bad = [((h_s.view(6, 2, 2), w_s, h_t, w_t, w), {}, "shapes"),
           ((h_s, w_s, h_t.view(6, 2, 2), w_t, w), {}, "shapes"),
           ((h_s, w_s, h_t[:-1], w_t, w), {}, "shapes"),
           ((h_s, w_s, h_t, w_t, w[:-1]), {}, "shapes"), ((h_s, w_s[:-1], h_t, w_t, w), {}, "student vocab 10"),
           ((h_s, w_s, h_t, w_t, w), dict(chunk=0), "chunk must be >= 1"),
           ((h_s, w_s, h_t, w_t, w), dict(labels=lab), "together"),
           ((h_s, w_s, h_t, w_t, w), dict(ce_weights=cw), "together"),
           ((h_s, w_s, h_t, w_t, w), dict(labels=lab.int(), ce_weights=cw), "need int64"),
           ((h_s, w_s, h_t, w_t, w), dict(labels=lab, ce_weights=cw[:-1]), "need int64"),
           ((h_s, w_s, h_t, w_t, w), dict(labels=lab[:-1], ce_weights=cw[:-1]), "need int64")]
    for args, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            chunked_logit_loss(*args, fn, cap=None, **kw)
    want = chunked_logit_loss(h_s, w_s, h_t, w_t, w, fn, cap=None, chunk=6)
    torch.testing.assert_close(chunked_logit_loss(h_s, w_s, h_t, w_t, w, fn, cap=None, chunk=1), want)


def test_hidden_state_loss_guards():
    """Lists of other lengths, or a student / teacher pair of other shapes, are refused."""
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="differ in length"):
        hidden_state_loss([a], [b], [1.0, 1.0])
    with pytest.raises(ValueError, match="differ in length"):
        hidden_state_loss([a, a], [b], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"student hidden \(2, 3\) != teacher \(3, 2\)"):
        hidden_state_loss([a], [b.T], [1.0])


def test_per_token_loss_fn_passes_its_settings_on():
    """The gjsd closure uses the given beta and temperature (reference: softmax probabilities in float64), the
    forward_kl one its temperature with the T^2 factor; the attributes the fused path reads are set; an unknown kind
    is refused (mutation: an argument dropped from a closure)."""
    g = torch.Generator().manual_seed(1)
    s, t = 3 * torch.randn(4, 9, generator=g), 3 * torch.randn(4, 9, generator=g)
    beta, T = 0.3, 2.0
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    m = beta * p + (1 - beta) * q
    ref = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    fn = per_token_loss_fn("gjsd", beta=beta, temperature=T)
    torch.testing.assert_close(fn(s, t).double(), ref, rtol=1e-5, atol=1e-7)
    assert (fn.kind, fn.beta, fn.temperature) == ("gjsd", beta, T)
    fkl = per_token_loss_fn("forward_kl", temperature=T)
    torch.testing.assert_close(fkl(s, t).double(), T * T * (p * (p / q).log()).sum(-1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(generalized_jsd(s, t, beta, 1.0), fn(s, t))   # the temperature matters here
    with pytest.raises(ValueError, match="unknown logit loss 'kl'"):
        per_token_loss_fn("kl")


# ============================================================== distill/train.py (guards, pure functions)
def test_lr_at_warmup_ends_at_the_peak_and_the_cosine_starts_there():
    """Warm-up steps 0..W-1 rise linearly to lr (step W-1 is lr); step W is the cosine's start, lr again, never
    above it; the last step is lr * min_lr_ratio; with no warm-up step 0 is at lr (mutation: step < W -> <=)."""
    cfg = DistillConfig(teacher="t", student="s", out="o", steps=20, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, cfg) == pytest.approx(1e-3)
    assert max(lr_at(s, cfg) for s in range(20)) <= 1e-3 * (1 + 1e-12)
    assert lr_at(19, cfg) == pytest.approx(1e-4)
    mid = 4 + (19 - 4) / 2   # halfway along the cosine: (lr + floor) / 2
    cfg_odd = DistillConfig(teacher="t", student="s", out="o", steps=21, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(int(mid) + 1, cfg_odd) == pytest.approx(0.5 * (1e-3 + 1e-4))
    cfg0 = DistillConfig(teacher="t", student="s", out="o", steps=5, lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg0) == pytest.approx(1e-3) and lr_at(4, cfg0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("steps", [2, 3, 7])
def test_lr_at_a_warmup_of_all_but_one_step_still_ends_at_the_floor(steps):
    """``--warmup-steps steps-1`` (the default for a two-step run): the warm-up peaks at step steps-2 and the last
    step is the floor, as for any other warm-up, not a second step at the peak; a one-step run trains at lr."""
    cfg = DistillConfig(teacher="t", student="s", out="o", steps=steps, lr=1e-3, warmup_steps=steps - 1,
                        min_lr_ratio=0.1)
    assert lr_at(steps - 2, cfg) == pytest.approx(1e-3)
    assert lr_at(steps - 1, cfg) == pytest.approx(1e-4)
    one = DistillConfig(teacher="t", student="s", out="o", steps=1, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, one) == pytest.approx(1e-3)


def test_loss_parts_keeps_the_terms_only():
    """The bookkeeping keys and the total are not loss terms; per_layer=False drops the hidden_mse/<i> split."""
    rec = {"step": 3, "lr": 1e-4, "grad_norm": 2.0, "on_policy": True, "loss": 5.0, "forward_kl": 1.0,
           "hidden_mse": 4.0, "hidden_mse/0": 1.5, "hidden_mse/3": 2.5, "data_ce": 0.5}
    assert loss_parts(rec) == {"forward_kl": 1.0, "hidden_mse": 4.0, "hidden_mse/0": 1.5, "hidden_mse/3": 2.5,
                               "data_ce": 0.5}
    assert list(loss_parts(rec, per_layer=False)) == ["forward_kl", "hidden_mse", "data_ce"]


def test_eos_ids_priority_and_shapes():
    """EOS ids come from the generation config, else the model config, else the tokenizer, else none; a single id
    or a list of ids (each a Python int)."""
    def model(gen=None, cfg=None):
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen),
                               config=SimpleNamespace(eos_token_id=cfg))
    tok = SimpleNamespace(eos_token_id=9)
    got = _eos_ids(model(gen=[1, torch.tensor(106)], cfg=2), tok)
    assert got == [1, 106] and all(type(i) is int for i in got)
    assert _eos_ids(model(cfg=(2, 3)), tok) == [2, 3]
    assert _eos_ids(model(), tok) == [9]
    assert _eos_ids(model(), None) == [] and _eos_ids(model(), SimpleNamespace(eos_token_id=None)) == []
    assert _eos_ids(SimpleNamespace(config=SimpleNamespace()), tok) == [9]


def test_refuse_at_or_inside_compares_paths_not_strings(tmp_path):
    """A path equal to an input or under it is refused; a sibling whose name merely starts with the input's
    (teacher2 beside teacher) or a parent of it is not (compared as resolved paths)."""
    inputs = {"teacher": tmp_path / "teacher"}
    for bad in (tmp_path / "teacher", tmp_path / "teacher" / "x" / "log.jsonl", tmp_path / "a" / ".." / "teacher"):
        with pytest.raises(ValueError, match="must not be the teacher"):
            _refuse_at_or_inside("--log-json", bad, inputs)
    for ok in (tmp_path / "teacher2", tmp_path / "teacher.jsonl", tmp_path):
        _refuse_at_or_inside("--log-json", ok, inputs)


def _out_cfg(tmp_path, **kw):
    for d in ("t", "s"):
        (tmp_path / d).mkdir(exist_ok=True)
    return DistillConfig(teacher=str(tmp_path / "t"), student=str(tmp_path / "s"), out=str(tmp_path / "o"), **kw)


def test_prepare_output_refuses_a_directory_log_and_a_file_ckpt_dir(tmp_path):
    """--log-json naming a folder (or the checkpoint folder) and --ckpt-dir naming a file are refused before
    anything runs; a fresh output with a sibling log and checkpoint folder passes."""
    (tmp_path / "logs").mkdir()
    with pytest.raises(ValueError, match="--log-json .*is a directory"):
        _prepare_output(_out_cfg(tmp_path, log_json=str(tmp_path / "logs")), CPU1)
    with pytest.raises(ValueError, match="--log-json .*is a directory"):
        _prepare_output(_out_cfg(tmp_path, log_json=str(tmp_path / "ck"), ckpt_dir=str(tmp_path / "ck")), CPU1)
    (tmp_path / "ckfile").write_text("x")
    with pytest.raises(ValueError, match="--ckpt-dir .*is a file"):
        _prepare_output(_out_cfg(tmp_path, ckpt_dir=str(tmp_path / "ckfile")), CPU1)
    _prepare_output(_out_cfg(tmp_path, log_json=str(tmp_path / "log.jsonl")), CPU1)
    assert not (tmp_path / "o").exists()


def test_no_usable_checkpoint_only_refuses_when_something_is_there(tmp_path):
    """--resume with no checkpoint folder, or an empty one, starts over; step folders with no 'latest', or a
    'latest' alone, are refused (starting over would delete them); step-* files are not step folders."""
    _no_usable_checkpoint(tmp_path / "missing")
    ck = tmp_path / "ck"
    ck.mkdir()
    _no_usable_checkpoint(ck)
    (ck / "step-00000003").write_text("not a folder")
    _no_usable_checkpoint(ck)
    (ck / "latest").write_text("step-00000007\n")
    with pytest.raises(ValueError, match=r"\(none\) but none that 'latest' \(step-00000007\)"):
        _no_usable_checkpoint(ck)
    (ck / "latest").unlink()
    (ck / "step-00000002").mkdir()
    with pytest.raises(ValueError, match=r"\(step-00000002\) but none that 'latest' \(missing\)"):
        _no_usable_checkpoint(ck)


def test_log_rewind_keeps_what_precedes_the_resumed_step(tmp_path):
    """rewind(k) keeps the config record and the step records up to k (they are not written again), drops later
    steps, the summary and lines cut short; rewind(0) (a resume that found no checkpoint) drops the config too (it is
    written again). Mutations: step > k -> >=, the config clause."""
    path = tmp_path / "log.jsonl"
    recs = [{"event": "config"}, *({"event": "step", "step": s} for s in (1, 2, 3)), {"event": "summary"}]
    body = "".join(json.dumps(r) + "\n" for r in recs) + '{"event": "st'

    for k, want in ((2, recs[:3]), (0, [])):
        path.write_text(body)
        log = _Log(SimpleNamespace(is_main=True), str(path), append=True)
        log.rewind(k)
        log.record({"event": "next"})
        log.close()
        assert [json.loads(x) for x in path.read_text().splitlines()] == [*want, {"event": "next"}], k


def _rows_self(phase, rank=0, world=1, lmbda=0.0, eos=(), sample=None, seed=4, batch=4, C=3):
    cfg = SimpleNamespace(phase=phase, max_new_tokens=C, seed=seed, lmbda=lmbda, batch=batch)
    env = DistEnv(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    return SimpleNamespace(cfg=cfg, env=env, eos_ids=list(eos), _sample=sample)


def test_rows_phase1_scores_every_position_with_the_mean_weight():
    """Phase 1: every one of the B*S positions, each weighted 1/(B*S), ids unchanged, never on-policy."""
    ids = torch.arange(12).view(2, 6)
    out, rows, w, pol = Distiller._rows(_rows_self(1), 0, ids)
    assert out is ids and rows.tolist() == list(range(12)) and not pol
    assert torch.equal(w, torch.full((12,), 1 / 12))


def test_rows_phase2_off_policy_scores_the_logits_before_each_continuation_token():
    """Phase 2 from the data: for each row b the positions P-1 .. S-2 (their logits predict tokens P .. S-1), flat
    b*S + s; weights world / (continuation tokens of all ranks) (other ranks' count simulated)."""
    ids = torch.arange(16).view(2, 8)
    S, C = 8, 3
    out, rows, w, pol = Distiller._rows(_rows_self(2, lmbda=0.0, C=C), 0, ids)
    assert out is ids and not pol
    assert rows.tolist() == [b * S + s for b in range(2) for s in range(S - C - 1, S - 1)]
    assert torch.equal(w, torch.full((6,), 1 / 6))


def test_rows_phase2_on_policy_seeds_by_global_row_and_masks_after_eos(monkeypatch):
    """On-policy: the prompt keeps the first S-C tokens, the continuation is the sampler's; each row's generator is
    seeded from its global row index (step*B + rank*B/W + i); tokens after a row's first EOS are not scored; the
    weights are world / (valid tokens of all ranks)."""
    S, C, eos = 7, 3, 99
    ids = torch.arange(14).view(2, 7)
    seen = {}
    new = torch.tensor([[5, eos, 6], [7, 8, 9]])

    def sample(prompts, n, seeds):
        seen.update(prompts=prompts.clone(), n=n, seeds=seeds)
        return new

    other_rank_valid = 5
    monkeypatch.setattr(parallel, "all_reduce_sum", lambda t, env: t + other_rank_valid)
    out, rows, w, pol = Distiller._rows(_rows_self(2, rank=1, world=2, lmbda=1.0, eos=[eos], sample=sample,
                                                   batch=4, C=C), 3, ids)
    assert pol and seen["n"] == C and torch.equal(seen["prompts"], ids[:, :S - C])
    assert seen["seeds"] == [row_seed(4, 3, 3 * 4 + 1 * 2 + i) for i in range(2)]
    assert torch.equal(out, torch.cat([ids[:, :S - C], new], 1))
    mask = continuation_mask(new, [eos])
    want = [b * S + (S - C - 1) + j for b in range(2) for j in range(C) if mask[b, j]]
    assert rows.tolist() == want == [3, 4, 10, 11, 12]
    assert torch.equal(w, torch.full((5,), 2 / (5 + other_rank_valid)))


def test_flops_per_token_counts_the_head_for_the_continuation_share():
    """6 N_student + 2 N_teacher per token in phase 1. Phase 2: the lm_head's V x d weights only for the
    max_new_tokens / seq_len share of positions, the rest for every position: computed here from per-position
    FLOPs summed over one window (a continuation covering the whole window gives phase 1's count)."""
    ns, nt, head = 1000, 3000, 200

    def fpt(phase, C, S):
        fake = SimpleNamespace(cfg=SimpleNamespace(phase=phase, max_new_tokens=C, seq_len=S), n_student=ns,
                               n_teacher=nt, n_head=head)
        return Distiller.flops_per_token.fget(fake)

    assert fpt(1, 3, 8) == 6 * ns + 2 * nt
    S, C = 8, 3
    window = sum(6 * (ns - head) + 2 * (nt - head) + (6 * head + 2 * head) * (s >= S - C) for s in range(S))
    assert fpt(2, C, S) == pytest.approx(window / S)
    assert fpt(2, S, S) == pytest.approx(fpt(1, C, S))


def _history(n: int, phase: int):
    g = torch.Generator().manual_seed(n)
    keys = ["forward_kl", "data_ce", "hidden_mse", "hidden_mse/1", "hidden_mse/3"] if phase == 1 else ["gjsd"]
    return [{"step": i + 1, "on_policy": bool(i % 2), "loss": float(torch.rand((), generator=g)),
             **{k: float(torch.rand((), generator=g)) for k in keys}} for i in range(n)]


def test_summary_figures_phase1():
    """The lineage summary of a phase-1 run: loss_first is the first record, loss_last10 the mean of the last ten
    (or of all when fewer), both without the per-layer split; the hidden term's layer weights as given, normalised
    (hidden_weight divided out); the data term listed only with --ce-weight; tokens_seen = steps x batch x seq_len;
    no generated_tokens; the EMA block only with --ema-decay, with the start's share decay^steps."""
    data = SimpleNamespace(source="d.jsonl", sha256="ab", tokenizer_sha256=None, tokens=999, selection=None)
    cfg = DistillConfig(teacher="t", student="s", out="o", steps=12, batch=2, seq_len=16, hidden_weight=2.0,
                        hidden_layers=[1, 3], hidden_layer_weights=[1.0, 3.0], ce_weight=0.2, ema_decay=0.5)
    layers, layer_w = cfg.layer_selection(6)
    for n in (12, 4):
        hist = _history(n, 1)
        got = _summary(cfg, data, hist, 0, layers, layer_w, CPU1)
        keys = ["loss", "forward_kl", "data_ce", "hidden_mse"]
        assert got["loss_first"] == {k: hist[0][k] for k in keys}
        tail = hist[-10:]
        assert got["loss_last10"] == pytest.approx({k: sum(h[k] for h in tail) / len(tail) for k in keys})
    assert got["losses"]["hidden_mse"]["layer_weights"] == pytest.approx([0.25, 0.75])
    assert got["losses"]["hidden_mse"]["layers"] == [1, 3] and got["losses"]["data_ce"]["weight"] == 0.2
    assert got["tokens_seen"] == 12 * 2 * 16 and "generated_tokens" not in got
    assert got["ema"]["start_weight"] == pytest.approx(0.5 ** 12)
    no_ce = DistillConfig(teacher="t", student="s", out="o", steps=12, batch=2, seq_len=16, hidden_weight=0.0)
    got = _summary(no_ce, data, _history(3, 1), 0, [], [], CPU1)
    assert set(got["losses"]) == {"forward_kl"} and "ema" not in got


def test_summary_figures_phase2():
    """Phase 2: the GJSD and on-policy settings, and the sampled tokens passed in, recorded."""
    data = SimpleNamespace(source="d.jsonl", sha256="ab", tokenizer_sha256=None, tokens=999, selection=None)
    cfg = DistillConfig(teacher="t", student="s", out="o", phase=2, steps=3, batch=2, seq_len=64, max_new_tokens=8,
                        beta=0.25, lmbda=0.75)
    got = _summary(cfg, data, _history(3, 2), 32, [], [], CPU1)
    assert got["generated_tokens"] == 32 and got["losses"]["gjsd"]["beta"] == 0.25
    assert got["losses"]["on_policy"] == {"lmbda": 0.75, "sample_temperature": cfg.sample_temperature,
                                          "max_new_tokens": 8}
    assert list(got["loss_first"]) == ["loss", "gjsd"]
