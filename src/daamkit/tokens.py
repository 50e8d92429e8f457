"""Prompt words <-> token positions (:class:`TokenAlignment`).

A DAAM heat map is indexed by token position on the key axis of the text-image attention, but users
ask for *words*. This module maps one to the other for the tokenizers diffusers pipelines use:

* CLIP BPE (SD 1.x/2.x, both SDXL tokenizers, SD3's two CLIP encoders): the pre-tokenizer splits the
  lower-cased prompt into chunks (letter runs, single digits, punctuation runs, ``'s``-style
  contractions) and BPE splits each chunk into tokens; the last token of a chunk ends in ``</w>``.
* T5 sentencepiece (SD3, Flux): a token starting with ``'▁'`` starts a whitespace-separated piece.
* WordPiece (HunyuanDiT's BERT): a token starting with ``##`` continues the word before it.

The special tokens a tokenizer wraps a prompt in (BOS/EOS, BERT's ``[CLS]``/``[SEP]``, ChatGLM's
``[gMASK] sop``) and padding on either side (ChatGLM pads on the left) belong to no word.

The unit of alignment -- a :class:`Word` -- is one CLIP pre-tokenizer chunk, whatever the tokenizer:
for sentencepiece, a ``'▁'`` piece is further split wherever a token boundary coincides with a CLIP
chunk boundary, so ``"dog,"`` gives the words ``dog`` and ``,`` for both tokenizer families and the same
query works for every encoder of a pipeline. Consequences worth knowing: ``"dog's"`` is the two words
``dog`` and ``'s``; a number is one word per digit (CLIP sees ``1 2 3``); both are still found by the
queries ``"dog's"`` and ``"123"`` because :meth:`TokenAlignment.find` matches runs of consecutive words.
A word never splits a token, so a sentencepiece token spanning two chunks (T5's ``▁12``) keeps them one
word (``12``; the query ``"12"`` finds it, ``"1"`` does not).

Matching is on whole words only: ``"dog"`` never matches ``"hotdog"`` nor ``"sunflowerdog"`` (which
CLIP splits into ``sun flower dog</w>``), because a word is never split by a query.

Truncation: pipelines cut the token sequence at the tokenizer's max length (CLIP: BOS + 75 tokens +
EOS = 77). When :func:`align` is given the prompt, words past the cut are kept with ``truncated=True``
and no positions, so asking for them raises :class:`TruncatedWordError` instead of a confusing "not
found". A word cut in the middle (e.g. ``hippopotamus`` -> ``hippo potam | us``) keeps the positions of
the tokens the model saw and is marked ``truncated=True``: the model did attend to those tokens, so
their map is real, and the flag tells the caller it is a partial word. Only words with no positions
at all count as "past the cut". Without the original prompt, :func:`recover_prompt` rebuilds one from
the ids and the text diffusers reports as truncated.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from daamkit.errors import DaamkitError

__all__ = [
    "TokenAlignment",
    "TruncatedWordError",
    "Word",
    "WordNotFoundError",
    "align",
    "concat_alignments",
    "recover_prompt",
    "split_words",
]

_FORMAT = "daamkit.TokenAlignment"
_VERSION = 1
# CLIP's pre-tokenizer tries these before a letter run, in this order ("'dog" -> "'d", "og").
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CLIP_END = "</w>"
_SP_START = "\u2581"  # '▁'
_BYTE_SPACE = "\u0120"  # 'Ġ': a leading space in byte-level BPE (GPT-2, Qwen)
_WORDPIECE_CONT = "##"
_PUNCT_SYMBOL_CATEGORIES = {"Sm", "Sc", "Sk"}
# Unicode White_Space, what the tokenizers' regexes call \s. Python's str.isspace() also counts the
# separators U+001C..U+001F, which CLIP keeps as (byte-level) tokens.
_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)


# --------------------------------------------------------------------------------------------- errors
class WordNotFoundError(DaamkitError, KeyError):
    """The query is not a (sequence of) whole word(s) of the prompt.

    A ``KeyError`` so that ``maps.word(...)`` behaves like a mapping lookup, but with a readable
    message (``KeyError.__str__`` would print the repr of the message) that lists the prompt's words,
    because the usual cause is a typo or a word the tokenizer splits differently than expected.
    """

    def __init__(self, message: str, query: str = "", words: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.query = query
        self.words = list(words)

    def __str__(self) -> str:
        return self.message


class TruncatedWordError(WordNotFoundError):
    """The query is a word of the prompt, but only past the tokenizer's cut: the model never saw it."""


# ------------------------------------------------------------------------------------------ word split
def _kind(ch: str) -> str:
    if ch in _WHITESPACE:
        return "space"
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return "letter"
    if cat[0] == "N":
        return "number"
    return "other"


def _unit_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of CLIP's pre-tokenizer chunks of ``text`` (already normalised).

    Mirrors the regex ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` of the CLIP
    tokenizer with the standard library only (``re`` has no ``\\p{..}``); the property tests compare
    it with the real pre-tokenizer.
    """
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "space":
            i += 1
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            j = i + len(contraction)
        elif kind == "number":
            j = i + 1
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        spans.append((i, j))
        i = j
    return spans


def _normalise(text: str) -> str:
    # What CLIP's normaliser does (NFC, lower case); whitespace only separates words.
    return unicodedata.normalize("NFC", text).lower()


def split_words(text: str) -> list[str]:
    """Split ``text`` into the words an alignment uses (CLIP's pre-tokenizer chunks), lower-cased.

    >>> split_words("A dog's hot-dog, 12!")
    ['a', 'dog', "'s", 'hot', '-', 'dog', ',', '1', '2', '!']
    """
    norm = _normalise(text)
    return [norm[a:b] for a, b in _unit_spans(norm)]


def _is_punctuation(text: str) -> bool:
    # Emoji and other "So" symbols stay words: "a 🐶 on a bench" should list the dog.
    return bool(text) and all(
        unicodedata.category(c)[0] == "P" or unicodedata.category(c) in _PUNCT_SYMBOL_CATEGORIES for c in text
    )


# ------------------------------------------------------------------------------------------ data model
@dataclass(frozen=True)
class Word:
    """One word of the prompt and the token positions the model saw for it."""

    text: str  # normalised as the tokenizer sees it (lower case)
    index: int  # index in TokenAlignment.words
    occurrence: int  # 0 for the first word with this text, 1 for the second, ... (truncated ones count)
    positions: tuple[int, ...]  # positions on the attention's key axis; () if wholly past the cut
    truncated: bool  # True if the tokenizer cut (part of) the word
    is_punctuation: bool  # only punctuation / math / currency symbols

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "index": self.index,
            "occurrence": self.occurrence,
            "positions": list(self.positions),
            "truncated": self.truncated,
            "is_punctuation": self.is_punctuation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Word:
        return cls(
            text=str(d["text"]),
            index=int(d["index"]),
            occurrence=int(d["occurrence"]),
            positions=tuple(int(p) for p in d["positions"]),
            truncated=bool(d["truncated"]),
            is_punctuation=bool(d["is_punctuation"]),
        )


@dataclass(frozen=True)
class TokenAlignment:
    """Words of one prompt and their token positions in the sequence one text encoder received."""

    tokens: tuple[str, ...]  # one string per position of the sequence the model saw (incl. BOS/EOS/pad)
    words: tuple[Word, ...]  # in prompt order, including truncated ones (positions=())
    max_length: int  # e.g. 77
    prompt: str | None = None

    # -------------------------------------------------------------------------------------- listing
    def word_texts(self, include_punctuation: bool = False) -> list[str]:
        """Texts of the words the model saw, in order (words wholly past the cut are left out)."""
        return [w.text for w in self.words if w.positions and (include_punctuation or not w.is_punctuation)]

    @property
    def truncated_words(self) -> list[Word]:
        """Words the tokenizer cut, wholly or partly."""
        return [w for w in self.words if w.truncated]

    # ------------------------------------------------------------------------------------- lookup
    def _matches(self, units: list[str]) -> list[tuple[Word, ...]]:
        target = "".join(units)
        bounds, acc = set(), 0
        for u in units:
            acc += len(u)
            bounds.add(acc)
        found: list[tuple[Word, ...]] = []
        i, words = 0, self.words
        while i < len(words):
            pos, j = 0, i
            while j < len(words) and pos < len(target):
                t = words[j].text
                # A word is never split by the query, and a query chunk never joins two words
                # ("adog" does not match "a dog"): every word end must be a chunk end.
                if not t or not target.startswith(t, pos) or (pos + len(t)) not in bounds:
                    break
                pos += len(t)
                j += 1
            if pos == len(target) and j > i:
                found.append(words[i:j])
                i = j  # non-overlapping, like str.count
            else:
                i += 1
        return found

    def _describe(self) -> str:
        seen = ", ".join(w.text for w in self.words if w.positions) or "(none)"
        cut = [w.text for w in self.words if not w.positions]
        msg = f"words: {seen}"
        if cut:
            msg += f"; past the {self.max_length}-token limit: {', '.join(cut)}"
        return msg

    def find(self, query: str, occurrence: int | None = None) -> list[Word]:
        """Words matching ``query`` (one word or several consecutive words), case-insensitively.

        ``occurrence=None`` returns the words of every occurrence the model saw (all of them are
        usually what a heat map should average); ``occurrence=k`` picks the k-th (0-based) occurrence,
        counting occurrences past the cut too, so that k means the same with or without truncation.

        Raises :class:`WordNotFoundError` (listing the prompt's words) if the query is not made of
        whole words of the prompt, :class:`TruncatedWordError` if it only occurs past the cut (or the
        chosen occurrence does), and ``ValueError`` if ``occurrence`` is out of range.
        """
        units = split_words(query)
        if not units:
            raise ValueError(f"empty query {query!r}: ask for a word of the prompt ({self._describe()})")
        matches = self._matches(units)
        where = f"the prompt {self.prompt!r}" if self.prompt is not None else "the prompt"
        if not matches:
            raise WordNotFoundError(
                f"{query!r} is not a word of {where}; {self._describe()}", query, [w.text for w in self.words]
            )
        if occurrence is not None:
            if not 0 <= occurrence < len(matches):
                times = "once" if len(matches) == 1 else f"{len(matches)} times"
                raise ValueError(
                    f"{query!r} occurs {times}; occurrence must be 0..{len(matches) - 1} (or None for all)"
                )
            chosen = [matches[occurrence]]
        else:
            chosen = matches
        seen = [m for m in chosen if all(w.positions for w in m)]
        if not seen:
            which = "" if occurrence is None else f" (occurrence {occurrence})"
            raise TruncatedWordError(
                f"{query!r}{which} lies past the tokenizer's {self.max_length}-token limit: the prompt was "
                f"cut there and the model never saw it; {self._describe()}",
                query,
                [w.text for w in self.words],
            )
        return [w for m in seen for w in m]

    def positions(self, query: str, occurrence: int | None = None) -> list[int]:
        """Sorted token positions of :meth:`find`'s words (what a word heat map averages over)."""
        return sorted({p for w in self.find(query, occurrence) for p in w.positions})

    # ---------------------------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` gives back an equal alignment."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "tokens": list(self.tokens),
            "words": [w.to_dict() for w in self.words],
            "max_length": self.max_length,
            "prompt": self.prompt,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenAlignment:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a daamkit token alignment (expected format {_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise ValueError(
                f"unsupported token alignment version {d.get('version')!r} (expected {_VERSION})"
            )
        return cls(
            tokens=tuple(str(t) for t in d["tokens"]),
            words=tuple(Word.from_dict(w) for w in d["words"]),
            max_length=int(d["max_length"]),
            prompt=d["prompt"],
        )


# ------------------------------------------------------------------------------------------- align
def _token_text(tokenizer: Any, tokens: Sequence[str]) -> str:
    # transformers 5's CLIPTokenizer leaves "</w>" in convert_tokens_to_string; byte-level and
    # sentencepiece decoding are the tokenizer's business.
    return tokenizer.convert_tokens_to_string(list(tokens)).replace(_CLIP_END, " ").strip(_WHITESPACE).lower()


def _group(tokens: Sequence[str], wordpiece: bool = False) -> list[list[int]]:
    """Token indices grouped by the tokenizer's own word markers (WordPiece: a ``##`` token continues
    the word before it)."""
    clip = any(t.endswith(_CLIP_END) for t in tokens)
    groups: list[list[int]] = []
    cur: list[int] = []
    for k, t in enumerate(tokens):
        if wordpiece:
            starts = not t.startswith(_WORDPIECE_CONT)
        else:
            starts = not clip and t.startswith((_SP_START, _BYTE_SPACE))
        if starts and cur:
            groups.append(cur)
            cur = []
        cur.append(k)
        if clip and t.endswith(_CLIP_END):
            groups.append(cur)
            cur = []
    if cur:  # e.g. SDXL tokenizer_2's special '!' as the last token, or a sentencepiece tail
        groups.append(cur)
    return groups


def _is_wordpiece(tokenizer: Any) -> bool:
    """BERT-style WordPiece: words are not marked at their start but continued with ``##``."""
    try:
        return tokenizer.convert_tokens_to_string(["a", _WORDPIECE_CONT + "b"]).strip() == "ab"
    except Exception:
        return False


def _refine(tokenizer: Any, tokens: Sequence[str], group: list[int]) -> list[tuple[list[int], str]]:
    """Split a marker group at token boundaries that are also CLIP chunk boundaries."""
    full = _token_text(tokenizer, [tokens[k] for k in group])
    if len(group) == 1:
        return [(group, full)]
    cuts = {b for s in _unit_spans(full) for b in s}
    pieces: list[tuple[list[int], str]] = []
    cur: list[int] = []
    start = 0
    for n, k in enumerate(group):
        cur.append(k)
        if n == len(group) - 1:
            break
        prefix = _token_text(tokenizer, [tokens[m] for m in group[: n + 1]])
        # Byte-level tokens may end inside a character: then the prefix is not a prefix of the text.
        if prefix and full.startswith(prefix) and len(prefix) in cuts and len(prefix) > start:
            pieces.append((cur, full[start : len(prefix)].strip(_WHITESPACE)))
            cur, start = [], len(prefix)
    pieces.append((cur, full[start:].strip(_WHITESPACE)))
    return pieces


def _as_ids(input_ids: Any) -> list[int]:
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    ids = list(input_ids)
    if ids and isinstance(ids[0], list | tuple):
        if len(ids) != 1:
            raise ValueError(f"align() takes the ids of one prompt, got a batch of {len(ids)}: pass one row")
        ids = list(ids[0])
    return [int(i) for i in ids]


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a prompt's own tokens: CLIP's BOS/EOS, T5's EOS,
    BERT's ``[CLS]``/``[SEP]``, ChatGLM's ``[gMASK] sop`` (which are not among its special tokens)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    fallback = ([bos] if bos is not None else [], [eos] if eos is not None else [])
    try:
        wrapped = [int(i) for i in tokenizer("a").input_ids]
        bare = [int(i) for i in tokenizer("a", add_special_tokens=False).input_ids]
    except Exception:
        return fallback
    n = len(bare)
    at = next((i for i in range(len(wrapped) - n + 1) if n and wrapped[i : i + n] == bare), None)
    if at is None:
        return fallback
    return wrapped[:at], wrapped[at + n :]


def _content_span(tokenizer: Any, ids: list[int]) -> tuple[int, int, bool]:
    """``(start, end, has_eos)``: ``ids[start:end]`` are the prompt's tokens (no special tokens around
    them, no padding on either side)."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    prefix, suffix = _special_wrap(tokenizer)
    start = 0
    # Left padding (ChatGLM) comes before the prefix; a right-padding tokenizer's pad id may be a
    # real first token (SDXL's second tokenizer pads with '!').
    if getattr(tokenizer, "padding_side", "right") == "left" and pad is not None:
        while start < len(ids) and ids[start] == pad:
            start += 1
    if prefix and ids[start : start + len(prefix)] == prefix:
        start += len(prefix)
    elif bos is not None and start < len(ids) and ids[start] == bos:
        start += 1
    stop = suffix[0] if suffix else tokenizer.eos_token_id
    end = next((i for i in range(start, len(ids)) if ids[i] == stop), None) if stop is not None else None
    if end is not None:
        return start, end, True
    end = len(ids)
    while end > start and pad is not None and ids[end - 1] == pad:
        end -= 1
    return start, end, False


def _special_ids(tokenizer: Any) -> set[int]:
    """Named and extra special tokens, and added tokens flagged special: a chat template's markers
    (Mistral's ``[/INST]``) are often only the latter."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return ids


def _tokenize_ids(tokenizer: Any, text: str) -> tuple[list[str], list[int]]:
    # verbose=False: a prompt past the limit is expected here, not worth transformers' warning.
    kwargs = {"verbose": False} if getattr(tokenizer, "is_fast", False) else {}
    tokens = list(tokenizer.tokenize(text, **kwargs))
    return tokens, [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


def recover_prompt(
    tokenizer: Any, input_ids: Sequence[int] | Iterable[int], removed: str | None = None
) -> str | None:
    """A prompt text that :func:`align` accepts for ``input_ids``, rebuilt without the original prompt.

    For when only the ids and diffusers' "The following part of your input was truncated ...: [text]"
    report are at hand (pass that text as ``removed``). Joining ``decode(ids)`` and the removed text
    with a space is wrong when the cut falls inside a word (``hippo | potamus``): the joined text
    would tokenize as ``hippo</w>`` and no longer match the ids. So both joins are tried and the one
    whose tokens begin with the received ids is returned. If neither does (the removed text was
    mangled), the visible text alone is returned (the truncated words are lost, the visible ones stay
    right); if even that does not reproduce the ids (e.g. unknown tokens), ``None``, meaning: align
    without a prompt.
    """
    ids = _as_ids(input_ids)
    start, end, has_eos = _content_span(tokenizer, ids)
    content = ids[start:end]
    if len(ids) > end + has_eos:
        removed = None  # padded, so nothing was cut: the report belongs to another row
    visible = tokenizer.decode(content, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    visible = " ".join(visible.split())
    removed = " ".join((removed or "").split())
    candidates = [f"{visible} {removed}".strip(), f"{visible}{removed}"] if removed else []
    for candidate in [*candidates, visible]:
        _, cand_ids = _tokenize_ids(tokenizer, candidate)
        if candidate == visible and cand_ids == content:
            return candidate
        if candidate != visible and cand_ids[: len(content)] == content and len(cand_ids) > len(content):
            return candidate
    return None


def align(
    tokenizer: Any,
    input_ids: Sequence[int] | Iterable[int],
    prompt: str | None = None,
    max_length: int | None = None,
) -> TokenAlignment:
    """Align the words of a prompt with the ids one text encoder received.

    ``input_ids`` are exactly what the encoder saw (``BOS .. EOS pad ..`` for CLIP, ``.. EOS pad ..`` for
    T5): positions in the result index that sequence, i.e. the key axis of the attention. Positions
    after the first EOS are padding and belong to no word -- SDXL's second tokenizer pads with ``!``
    (id 0), a real token that must not become a word.

    Without ``prompt`` the words are read off the ids alone, so words past the cut are invisible.
    With ``prompt`` the full prompt is tokenized without truncation and must begin with the received
    ids (``ValueError`` otherwise: the pipeline encoded something else, e.g. a weighted or rewritten
    prompt); words the pipeline cut are then reported with ``truncated=True`` (see the module doc).

    ``max_length`` defaults to ``len(input_ids)`` when the ids were padded or cut (the key length),
    else to the tokenizer's ``model_max_length``.
    """
    ids = _as_ids(input_ids)
    start, end, has_eos = _content_span(tokenizer, ids)
    content = ids[start:end]
    n_seen = len(content)
    padded = len(ids) > end + (1 if has_eos else 0)

    if prompt is not None:
        text_tokens, full_ids = _tokenize_ids(tokenizer, prompt)
        if full_ids[:n_seen] != content:
            bad = next((k for k in range(n_seen) if k >= len(full_ids) or full_ids[k] != content[k]), n_seen)
            got = tokenizer.convert_ids_to_tokens([content[bad]])[0] if bad < n_seen else "(end)"
            want = text_tokens[bad] if bad < len(text_tokens) else "(end)"
            raise ValueError(
                f"the prompt {prompt!r} is not what the text encoder received: at token {bad} the prompt "
                f"gives {want!r} but input_ids have {got!r}. Pass the exact prompt the pipeline encoded "
                f"for this row, or prompt=None."
            )
        if len(full_ids) > n_seen and padded:
            raise ValueError(
                f"the prompt {prompt!r} has {len(full_ids)} tokens but input_ids hold only {n_seen} followed by "
                f"padding, so they were not cut at the limit: pass the prompt the pipeline encoded."
            )
    else:
        text_tokens = list(tokenizer.convert_ids_to_tokens(content))

    pieces: list[tuple[list[int], str]] = []
    for g in _group(text_tokens, _is_wordpiece(tokenizer)):
        pieces.extend(_refine(tokenizer, text_tokens, g))
    # A piece with no text (a lone '▁' before an unknown token, say) joins the next one.
    merged: list[tuple[list[int], str]] = []
    carry: list[int] = []
    for ks, text in pieces:
        if not text:
            carry.extend(ks)
            continue
        merged.append((carry + ks, text))
        carry = []
    if carry:
        if merged:
            merged[-1] = (merged[-1][0] + carry, merged[-1][1])
        else:
            merged.append((carry, ""))

    counts: dict[str, int] = {}
    words = []
    for index, (ks, text) in enumerate(merged):
        occ = counts.get(text, 0)
        counts[text] = occ + 1
        words.append(
            Word(
                text=text,
                index=index,
                occurrence=occ,
                positions=tuple(start + k for k in ks if k < n_seen),
                truncated=any(k >= n_seen for k in ks),
                is_punctuation=_is_punctuation(text),
            )
        )

    if max_length is None:
        mml = getattr(tokenizer, "model_max_length", None)
        cut = prompt is not None and len(text_tokens) > n_seen
        if padded or cut or not isinstance(mml, int) or mml > 1_000_000 or mml < len(ids):
            max_length = len(ids)
        else:
            max_length = mml
    return TokenAlignment(
        tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        words=tuple(words),
        max_length=int(max_length),
        prompt=prompt,
    )


def concat_alignments(parts: Sequence[TokenAlignment], total: int | None = None) -> TokenAlignment:
    """One alignment for a context made of several encoders' sequences laid end to end.

    SD3's joint attention sees [CLIP (77) | T5 (max_sequence_length)] tokens of the same prompt, so a
    word's map should pool its positions in both parts. Both tokenizations give the same word
    sequence (a word is a CLIP pre-tokenizer chunk for every tokenizer), so words are merged by index;
    a word is truncated only if every part cut it. If the parts disagree on the words (they were
    built from different prompts), the later part's positions are not attributed to any word rather
    than to a wrong one. ``total`` pads the token list (e.g. SD3 without T5: zeros, no words).
    """
    if not parts:
        raise ValueError("concat_alignments needs at least one alignment")
    tokens: list[str] = []
    offsets = []
    for p in parts:
        offsets.append(len(tokens))
        tokens.extend(p.tokens)
    if total is not None:
        if total < len(tokens):
            raise ValueError(f"the parts have {len(tokens)} tokens, more than the context's {total}")
        tokens.extend(["<none>"] * (total - len(tokens)))
    longest = max(parts, key=lambda p: len(p.words))
    words = []
    for i, base in enumerate(longest.words):
        positions: list[int] = []
        truncated = True
        for p, off in zip(parts, offsets, strict=True):
            if i < len(p.words) and p.words[i].text.lower() == base.text.lower():
                positions.extend(off + q for q in p.words[i].positions)
                truncated = truncated and p.words[i].truncated
        words.append(
            Word(
                text=base.text.lower(),
                index=i,
                occurrence=base.occurrence,
                positions=tuple(positions),
                truncated=truncated,
                is_punctuation=base.is_punctuation,
            )
        )
    prompt = next((p.prompt for p in parts if p.prompt), None)
    return TokenAlignment(tokens=tuple(tokens), words=tuple(words), max_length=len(tokens), prompt=prompt)


def _template_end(full: str, after: str) -> int:
    """Where the text after the last occurrence of ``after`` in ``full`` starts, or -1. A decoder may
    not reproduce the whitespace around the template text: then its stripped form is looked for."""
    at = full.rfind(after)
    if at >= 0:
        return at + len(after)
    at = full.rfind(after.strip()) if after.strip() else -1
    return at + len(after.strip()) if at >= 0 else -1


def prompt_window(
    tokenizer: Any, input_ids: Sequence[int] | Iterable[int], after: str | Sequence[str]
) -> tuple[int, int]:
    """``(start, end)``: where the prompt's own tokens lie in ids that wrap it in a template.

    Chat-template encoders (Qwen2.5-VL, Qwen3, Mistral, Gemma with an instruction prefix) put the
    prompt after a fixed text (``after``: e.g. ``"<|im_start|>user\\n"``) and close it with a special
    token. The prompt starts at the first token that reaches past the last occurrence of ``after`` in
    the decoded ids (whitespace-only tokens there are template), and ends at the next special token
    (end of turn, EOS, padding) or the end. ``after`` may be several texts (pipelines sharing one
    encoder with different templates, e.g. with and without a reference image's vision tokens before
    the prompt): the one whose last occurrence ends last counts. Raises ``ValueError`` when none is
    in the ids (the pipeline used another template).
    """
    ids = _as_ids(input_ids)
    texts = (after,) if isinstance(after, str) else tuple(after)

    def text(n: int) -> str:
        return tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    full = text(len(ids))
    target = max((_template_end(full, a) for a in texts), default=-1)
    if target < 0:
        raise ValueError(f"the template text {after!r} is not in the encoded prompt: cannot find the prompt's tokens")
    lo, hi = 0, len(ids)  # smallest n with len(text(n + 1)) > target, by bisection (decoding is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(text(mid + 1)) > target:
            hi = mid
        else:
            lo = mid + 1
    special = _special_ids(tokenizer)
    end = next((n for n in range(lo, len(ids)) if ids[n] in special), len(ids))
    while lo < end and not text(lo + 1)[len(text(lo)):].strip(_WHITESPACE):
        lo += 1
    return lo, end


def align_in_template(
    tokenizer: Any,
    input_ids: Sequence[int] | Iterable[int],
    after: str | Sequence[str],
    prompt: str | None = None,
    drop: int = 0,
    length: int | None = None,
) -> TokenAlignment:
    """:func:`align` for ids that wrap the prompt in a chat template or instruction prefix.

    The prompt is located in the whole ``input_ids`` (the template text ``after`` included); positions
    then index the keys the denoiser sees: ``input_ids[drop:]`` cut to ``length``. Template tokens
    belong to no word; words whose tokens fall past ``length`` are marked truncated. A ``prompt`` that
    does not tokenize to the ids inside the template (tokenizers may merge the first token with the
    text before it) is not trusted: the words are then read off the ids.
    """
    ids = _as_ids(input_ids)
    start, end = prompt_window(tokenizer, ids, after)
    inner = ids[start:end]
    try:
        part = align(tokenizer, inner, prompt, max_length=len(inner))
    except ValueError:
        part = align(tokenizer, inner, None, max_length=len(inner))
    keys = ids[drop:] if length is None else ids[drop : drop + length]
    words = []
    for w in part.words:
        shifted = [start + p - drop for p in w.positions]
        kept = tuple(p for p in shifted if 0 <= p < len(keys))
        words.append(Word(w.text, w.index, w.occurrence, kept, w.truncated or len(kept) < len(shifted), w.is_punctuation))
    return TokenAlignment(
        tokens=tuple(tokenizer.convert_ids_to_tokens(keys)), words=tuple(words), max_length=len(keys), prompt=part.prompt
    )
