"""The model card's Lineage section and the comments of ``vllm_config.yaml`` (pack/card.py), end to end through
``python -m pack.quantize`` on tiny checkpoints built here:

* a tiny random Llama stored as a Hugging Face hub snapshot (``hub/models--ORG--NAME/snapshots/REV``, no pdqkit
  lineage): the card names the base step's hub id AND revision; the Llama's vllm_config.yaml and card say nothing
  of Gemma-4, and the Triton attention line is explained by the Llama's own head width (and said to be optional);
* a text-only Gemma-4 micro pair distilled twice (``python -m distill`` phase 1, then phase 2 on its output): the
  card's two distill lines show each step's phase, steps, tokens seen and teacher, as the lineage records them, so
  they differ; the Gemma-4 attention comment names this model's widest head dim, read from its config.

Every expectation is read from the lineage (quant_recipe.json) or config.json of the output, not written here; the
same input gives a byte-identical card and vllm_config.yaml.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pack import card
from pack.quantize import main

HUB_ID = ("pdqkit-test", "tiny-llama")
REVISION = "89abcdef0123456789abcdef0123456789abcdef"  # a hub snapshot folder is named by its commit


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Plan and input-hash caches of this module's own (the autouse per-test ones come after module fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDQKIT_PLAN_CACHE", str(tmp_path_factory.mktemp("plans")))
        mp.setenv("PDQKIT_HASH_CACHE", str(tmp_path_factory.mktemp("hashes")))
        yield


def _quantize(src: Path, out: Path) -> Path:
    assert main([str(src), "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def llama_snapshot(tmp_path_factory, caches) -> Path:
    """A tiny random Llama (untied head, 2 heads of 64) as a hub snapshot folder: config + safetensors, no lineage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=640, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=2048,
                                         max_position_embeddings=512, tie_word_embeddings=False))
    snap = tmp_path_factory.mktemp("hub") / f"models--{HUB_ID[0]}--{HUB_ID[1]}" / "snapshots" / REVISION
    model.to(torch.bfloat16).save_pretrained(snap)
    return snap


@pytest.fixture(scope="module")
def llama_q(llama_snapshot, tmp_path_factory) -> Path:
    return _quantize(llama_snapshot, tmp_path_factory.mktemp("q") / "llama")


@pytest.fixture(scope="module")
def distilled_q(tmp_path_factory, caches) -> Path:
    """Gemma-4 micro teacher + MLP-sliced student (distill.toy.save_pair), distilled phase 1 (2 steps) and then
    phase 2 (3 steps, on-policy) from the phase-1 output, then quantized."""
    from distill.__main__ import main as distill_main
    from tests.distill_fixtures import saved_micro_pair

    root = tmp_path_factory.mktemp("distill")
    teacher, student, data = saved_micro_pair(root)
    common = ["--teacher", str(teacher), "--data", str(data), "--threads", "1", "--device", "cpu",
              "--batch", "2", "--seq-len", "32"]
    assert distill_main([*common, "--student", str(student), "-o", str(root / "d1"), "--steps", "2"]) == 0
    assert distill_main([*common, "--student", str(root / "d1"), "-o", str(root / "d2"), "--steps", "3",
                         "--phase", "2", "--max-new-tokens", "8"]) == 0
    return _quantize(root / "d2", tmp_path_factory.mktemp("q") / "distilled")


def _lineage(out: Path) -> list[dict]:
    return json.loads((out / "quant_recipe.json").read_text())["source_lineage"]


def _card_lineage(out: Path) -> dict[str, dict]:
    """{step id: {"kind", "from", "fields": {key: value as shown}}} from the card's Lineage section."""
    text = (out / "README.md").read_text()
    body = text.split("\n## Lineage\n", 1)[1].split("\n## ", 1)[0]
    steps = {}
    for line in body.strip().splitlines():
        m = re.fullmatch(r"- `([^`]+)`: \*\*(\w+)\*\*(?: \(from `([^`]+)`\))? ?(.*)", line)
        assert m, line
        fields = dict(kv.split("=", 1) for kv in m.group(4).split(", ")) if m.group(4) else {}
        steps[m.group(1)] = {"kind": m.group(2), "from": m.group(3), "fields": fields}
    return steps


def _comment_on(yaml_text: str, key: str) -> str:
    """The comment line above ``key``'s setting in vllm_config.yaml (every setting has one)."""
    lines = yaml_text.splitlines()
    (i,) = [i for i, ln in enumerate(lines) if ln.startswith(f"{key}:")]
    assert lines[i - 1].startswith("# "), lines[i - 1]
    return lines[i - 1][2:]


# ---------------------------------------------------------------------------------------------- lineage


def test_card_names_the_hub_revision_of_the_base(llama_snapshot, llama_q):
    """An input that is a hub snapshot gets a base step with its hub id and revision (pack.writer.base_step); the
    card shows both, and every lineage step in order with its ``from``."""
    lineage = _lineage(llama_q)
    base = lineage[0]
    assert base["kind"] == "base" and base["model"] == "/".join(HUB_ID) and base["revision"] == llama_snapshot.name
    shown = _card_lineage(llama_q)
    assert list(shown) == [s["id"] for s in lineage]
    assert [v["from"] for v in shown.values()] == [s.get("from") for s in lineage]
    assert shown[base["id"]]["fields"]["model"] == base["model"]
    assert shown[base["id"]]["fields"]["revision"] == base["revision"]


def test_card_tells_the_distill_phases_apart(distilled_q):
    """Each distill step's card line shows its phase, steps, tokens seen and teacher (the teacher directory's
    name) as the lineage records them: the phase-1 and phase-2 lines differ."""
    distill = [s for s in _lineage(distilled_q) if s["kind"] == "distill"]
    assert [s["phase"] for s in distill] == [1, 2]
    shown = _card_lineage(distilled_q)
    for s in distill:
        fields = shown[s["id"]]["fields"]
        assert shown[s["id"]]["kind"] == "distill"
        for key in ("phase", "steps", "tokens_seen", "seed"):
            assert fields[key] == str(s[key]), (s["id"], key)
        assert fields["teacher"] == Path(s["teacher"]["path"]).name
    first, second = (shown[s["id"]]["fields"] for s in distill)
    assert first != second and first["phase"] != second["phase"]


def test_same_input_same_card(llama_snapshot, llama_q, tmp_path):
    """Quantizing the same input again writes a byte-identical card and vllm_config.yaml."""
    again = _quantize(llama_snapshot, tmp_path / "again")
    for name in ("README.md", "vllm_config.yaml"):
        assert (again / name).read_bytes() == (llama_q / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- vllm_config.yaml


def test_llama_vllm_config_says_nothing_of_gemma4(llama_q):
    """A Llama's vllm_config.yaml and card name no Gemma-4 and carry no Gemma-4 setting (no head-dim override,
    no language-model-only); Triton attention stays (what pdqkit's vLLM runs use), its comment citing the Llama's
    own head width (config.json's hidden size / heads) and saying the line is optional; the card's LLM(...)
    snippet passes the same settings."""
    text = (llama_q / "vllm_config.yaml").read_text()
    readme = (llama_q / "README.md").read_text()
    assert "gemma" not in text.lower() and "gemma" not in readme.lower()
    settings = yaml.safe_load(text)
    assert set(settings) == {"dtype", "max-model-len", "attention-backend"}
    cfg = json.loads((llama_q / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    note = _comment_on(text, "attention-backend")
    assert f"({head_dim} wide)" in note and "optional" in note, note
    (llm_line,) = [ln for ln in readme.splitlines() if ln.startswith("llm = LLM(")]
    for k, v in settings.items():
        assert f"{k.replace('-', '_')}={json.dumps(v)}" in llm_line, (k, llm_line)


def test_gemma4_vllm_config_names_this_models_widest_heads(distilled_q):
    """A Gemma-4's attention comment gives Gemma-4's reason with this model's widest head dim (from its config's
    per-layer head dims, the head-dim override's global_head_dim), not a fixed width; the override's comment
    names Gemma-4."""
    from transformers import AutoConfig

    tc = AutoConfig.from_pretrained(distilled_q).get_text_config()
    widest = max(tc.per_layer_config[i].head_dim for i in range(tc.num_hidden_layers))
    text = (distilled_q / "vllm_config.yaml").read_text()
    assert yaml.safe_load(text)["hf-overrides"]["global_head_dim"] == widest
    note = _comment_on(text, "attention-backend")
    assert "Gemma-4" in note and f"this model's widest: {widest}" in note, note
    assert _comment_on(text, "hf-overrides").startswith("Gemma-4 head-dim fix")


@pytest.mark.parametrize("arch, dims, needed", [("LlamaForCausalLM", [64], False),
                                                ("LlamaForCausalLM", [96, 128], False),
                                                ("SomeForCausalLM", [512], True), ("SomeForCausalLM", None, None)])
def test_attention_comment_follows_the_head_dims(arch, dims, needed):
    """Without Gemma-4 the attention comment never names it: heads FlashAttention takes (up to 256) make the
    Triton line optional, wider ones are named as the reason; no head dims known (a plan cached before they were
    recorded holds none) gives a neutral comment."""
    serving = {"max_position_embeddings": 64, "multimodal": False, "head_dim_fix": None}
    if dims is not None:
        serving["head_dims"] = dims
    plan = SimpleNamespace(architecture=arch, serving=serving)
    note = _comment_on(card.vllm_config_yaml(plan), "attention-backend")
    assert "Gemma" not in note and "Triton attention" in note
    if needed is None:
        assert "optional" not in note and "wide" not in note
    elif needed:
        assert f"{max(dims)}-wide heads" in note and "optional" not in note
    else:
        assert "optional" in note and f"{max(dims)} wide" in note
