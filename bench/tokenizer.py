"""The bench tokenizers: byte-level BPE trained on the corpus' train split with HF ``tokenizers``.

* One tokenizer per vocabulary size: 2048 (``micro``) and 8192 (``small``), read from bench/factory.py so
  that tokenizer and model always agree. Byte-level (no unknown characters; ``<unk>`` exists for HF's sake
  and never appears), no normalizer, GPT-2 pre-tokenization regex (``ByteLevel``).
* Special tokens at the ids Gemma-4's config uses: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then ``<unk>`` 3.
  Encoding with special tokens prepends ``<bos>`` (as Gemma's tokenizer does); no ``<eos>`` is appended.
* Returned as a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``) whose ``save_pretrained``
  output (tokenizer.json + tokenizer_config.json) loads with ``AutoTokenizer`` and vLLM.
* Cached under ``$PDQKIT_CACHE/tokenizer-<corpus>-v<vocab>-<recipe>/`` (the key includes the
  ``tokenizers`` version, so an upgrade retrains); the tokenizer's own sha256
  (:func:`bench.corpus.tokenizer_sha256`) goes into lineage.
"""
from __future__ import annotations

import functools
import hashlib
import os

from bench.cache import cached_dir, sha256_text

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
RECIPE = "bytelevel-bpe/1"
# sha256 of (vocab, merges) per vocabulary size, trained on the pinned corpus (tokenizers 0.23.2 and 0.23.3,
# 1 or many threads, give the same): a tokenizer that differs fails loudly, like the corpus.
PINNED_VOCAB_SHA256 = {
    2048: "b047c43a6e1e72e15a434e3ddf6fbbcc9fa400a8ac5cfae8ebcf2199e89edc20",
    8192: "923351957588a32b5f615312b0ddc27837391de00f142d4f698f1aef6f538aa9",
}
TOKENIZER_SCALES = ("micro", "small")  # vocab sizes come from bench.factory

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_SCALES", "train_tokenizer", "get_tokenizer", "vocab_size_of",
           "vocab_sha256"]


def vocab_size_of(scale_or_vocab) -> int:
    """Vocabulary size of a bench scale (``micro``/``small``) or an int passed through."""
    if isinstance(scale_or_vocab, int):
        return scale_or_vocab
    if scale_or_vocab not in TOKENIZER_SCALES:
        raise ValueError(f"no bench tokenizer for scale {scale_or_vocab!r}; choose one of {TOKENIZER_SCALES} "
                         "or pass a vocabulary size")
    from bench.factory import _TEXT

    return int(_TEXT[scale_or_vocab]["vocab_size"])


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of exactly ``vocab_size`` entries trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", BOS_ID)])
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != [PAD_ID, EOS_ID, BOS_ID, UNK_ID] or tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"bench tokenizer: got special ids {got} and vocab {tok.get_vocab_size()}, expected "
                           f"[0, 1, 2, 3] and {vocab_size} (training text too small?)")
    return tok


def vocab_sha256(tok) -> str:
    """sha256 of a BPE tokenizer's (vocab, merges): what decides token ids, independent of file format."""
    import json

    backend = getattr(tok, "backend_tokenizer", tok)
    model = json.loads(backend.to_str())["model"]
    return hashlib.sha256(json.dumps([model["vocab"], model["merges"]], sort_keys=True).encode()).hexdigest()


def wrap(tok, model_max_length: int = 8192):
    """``tokenizers.Tokenizer`` -> transformers ``PreTrainedTokenizerFast`` with Gemma-4's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length)


@functools.lru_cache(maxsize=None)
def get_tokenizer(scale_or_vocab="micro"):
    """The bench tokenizer for a scale (or vocabulary size), trained once on the train split and cached."""
    import tokenizers
    from tokenizers import Tokenizer

    from bench import corpus

    vocab = vocab_size_of(scale_or_vocab)
    key = sha256_text(RECIPE, tokenizers.__version__)[:8]
    name = f"tokenizer-{corpus.corpus_sha256()[:12]}-v{vocab}-{key}"
    d = cached_dir(name, lambda tmp: train_tokenizer(corpus.load_texts("train"), vocab).save(
        str(tmp / "tokenizer.json")))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    want = PINNED_VOCAB_SHA256.get(vocab)
    if want and os.environ.get(corpus.UNPINNED_ENV) != "1" and vocab_sha256(tok) != want:
        raise corpus.CorpusError(
            f"bench tokenizer: vocab {vocab} trained by tokenizers {tokenizers.__version__} differs from the pinned "
            f"one ({vocab_sha256(tok)[:16]}… != {want[:16]}…); pip install tokenizers==0.23.3 (or set "
            f"{corpus.UNPINNED_ENV}=1; numbers are then not comparable)")
    return wrap(tok)
