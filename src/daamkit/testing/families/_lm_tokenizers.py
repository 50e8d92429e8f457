"""Small LLM-style tokenizers trained here: byte-level BPE (tiktoken-like: GLM-4, Llama 3) and sentencepiece
BPE with byte fallback (Gemma, LLaMA/Pile-T5).

The vocabularies are tiny (a few hundred pieces) but the algorithms, pre-tokenization and special tokens are
those of the real tokenizers, so prompt words made of ``T5_WORDS`` come out as one or a few tokens and
anything else falls back to bytes instead of failing.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

from daamkit.testing.tokenizers import T5_WORDS

# The split pattern of tiktoken's cl100k_base, which Llama 3 and GLM-4 both use before byte-level BPE.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def training_sentences(
    extra: Sequence[str] = (),
    extra_repeats: int = 20,
    words: Sequence[str] = T5_WORDS,
    sentences: int = 600,
    seed: int = 0,
) -> list[str]:
    """Random runs of ``words`` (sometimes capitalised, closed by punctuation), plus ``extra`` texts repeated so
    that fixed texts a pipeline always adds (system prompts) become whole tokens too."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        run = [rng.choice(words) for _ in range(rng.randint(3, 10))]
        if rng.random() < 0.3:
            run[0] = run[0].capitalize()
        out.append(" ".join(run) + rng.choice((".", ",", "!", "")))
    return out + list(extra) * extra_repeats


def byte_level_bpe(
    sentences: Sequence[str], special_tokens: Sequence[str], vocab_size: int = 500, pattern: str = CL100K_PATTERN
):
    """A ``tokenizers.Tokenizer`` with the layout of the Llama 3 / GLM-4 ``tokenizer.json``: regex split, then
    byte-level BPE (all 256 bytes in the alphabet); ``special_tokens`` get the ids after the learned vocabulary,
    in the given order, as in the real files. The post-processor is left to the caller."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(sentences, trainer)
    tok.add_special_tokens(list(special_tokens))
    return tok


def sentencepiece_bpe(
    sentences: Sequence[str],
    path: str | Path,
    *,
    vocab_size: int,
    unk: tuple[int, str],
    bos: tuple[int, str],
    eos: tuple[int, str],
    pad: tuple[int, str] | None,
    user_defined_symbols: Sequence[str] = (),
    add_dummy_prefix: bool = True,
) -> Path:
    """Train a sentencepiece BPE model with byte fallback (the LLaMA/Gemma kind) and write it to ``path``.

    ``unk``/``bos``/``eos``/``pad`` are ``(id, piece)``; ``user_defined_symbols`` follow them as whole pieces.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=unk[0],
        unk_piece=unk[1],
        bos_id=bos[0],
        bos_piece=bos[1],
        eos_id=eos[0],
        eos_piece=eos[1],
        pad_id=pad[0] if pad else -1,
        pad_piece=pad[1] if pad else "<pad>",
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(model.getvalue())
    return p
