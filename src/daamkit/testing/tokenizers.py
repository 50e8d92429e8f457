"""Tokenizers built offline for tests, benchmarks and the shapes world: CLIP BPE with the real ids (rebuilt
from the merges file that ships with the package) and a small trained T5 sentencepiece model.

Stable Diffusion's tokenizer is OpenAI's CLIP BPE. Its merges list (``bpe_simple_vocab_16e6.txt.gz``,
MIT licence, also shipped in ``open_clip_torch``) fully determines the vocabulary, so we can
produce ``vocab.json``/``merges.txt`` that give exactly the ids of ``openai/clip-vit-large-patch14``
without touching a model hub.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
_MERGES_USED = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def bpe_merges_path() -> Path:
    return Path(str(resources.files("daamkit.testing") / "data" / "bpe_simple_vocab_16e6.txt.gz"))


@lru_cache(maxsize=2)
def clip_merges(path: str | None = None) -> tuple[tuple[str, str], ...]:
    with gzip.open(path or bpe_merges_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : _MERGES_USED + 1])  # type: ignore[misc]


def clip_vocab(merges: tuple[tuple[str, str], ...] | None = None) -> dict[str, int]:
    merges = merges if merges is not None else clip_merges()
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer_files(out_dir: str | Path, merges: tuple[tuple[str, str], ...] | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for ``transformers.CLIPTokenizer`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = merges if merges is not None else clip_merges()
    (out / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def clip_tokenizer(out_dir: str | Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A ``CLIPTokenizer`` with Stable Diffusion's ids, saved (``save_pretrained``) to ``out_dir``.

    ``pad_token="!"`` gives SDXL's second tokenizer (OpenCLIP ViT-bigG pads with id 0).
    """
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(out_dir)
    tok = CLIPTokenizer(
        vocab=str(Path(out_dir) / "vocab.json"),
        merges=str(Path(out_dir) / "merges.txt"),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(str(out_dir))
    return tok


T5_WORDS = (
    "a the an dog dogs cat red blue green yellow on of and bench mat photo photograph sitting wooden park "
    "hippopotamus photorealistic sunflower circle square star heart above below in with tree house car bird"
).split()


def t5_tokenizer(
    out_dir: str | Path,
    model_max_length: int = 512,
    words: Sequence[str] = T5_WORDS,
    endings: Sequence[str] = (".", ",", "!", ""),
    sentences: int = 600,
    vocab_size: int = 120,
):
    """A ``T5TokenizerFast`` on a small sentencepiece model (unigram, ~120 pieces) trained here, saved to ``out_dir``.

    T5's code path (sentencepiece, ``</s>`` = 1, ``<pad>`` = 0, no BOS) without the real vocabulary, which
    is not available offline; words outside ``words`` split into characters. The training text is
    ``sentences`` random runs of ``words``, each closed by one of ``endings``.
    """
    import io
    import random

    import sentencepiece as spm
    from transformers import T5TokenizerFast

    rng = random.Random(0)
    sents = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice(endings)
        for _ in range(sentences)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "spiece.model").write_bytes(model.getvalue())
    tok = T5TokenizerFast.from_pretrained(str(d), extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(str(d))
    return tok
