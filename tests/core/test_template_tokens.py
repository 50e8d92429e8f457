"""Words of a prompt wrapped in a chat template (daamkit.tokens.align_in_template / prompt_window), with
the byte-level BPE Qwen tokenizers of Qwen-Image (Qwen2.5-VL) and Z-Image (Qwen3)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daamkit.capture.families import FAMILIES
from daamkit.testing.families.qwenimage import (
    QWENIMAGE_DROP,
    QWENIMAGE_EDIT_DROP,
    QWENIMAGE_EDIT_PROMPT_TEMPLATE,
    QWENIMAGE_PROMPT_TEMPLATE,
    qwen2_5_vl_tokenizer,
)
from daamkit.testing.families.zimage import qwen3_tokenizer
from daamkit.testing.tokenizers import T5_WORDS
from daamkit.tokens import WordNotFoundError, align_in_template, prompt_window, split_words

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
QWEN_AFTER = next(f for f in FAMILIES if f.name == "qwenimage").text[0].after
ZIMAGE_AFTER = next(f for f in FAMILIES if f.name == "zimage").text[0].after
VISION_TOKENS = 12  # <|image_pad|> tokens the processor puts in for a small reference image


@pytest.fixture(scope="module")
def tk_qwen(tmp_path_factory):
    return qwen2_5_vl_tokenizer(tmp_path_factory.mktemp("template_qwen2_5_vl"))


@pytest.fixture(scope="module")
def tk_qwen3(tmp_path_factory):
    return qwen3_tokenizer(tmp_path_factory.mktemp("template_qwen3"))


def edit_template() -> str:
    # what Qwen2VLProcessor hands the tokenizer: one <|image_pad|> per vision token
    return QWENIMAGE_EDIT_PROMPT_TEMPLATE.replace("<|image_pad|>", "<|image_pad|>" * VISION_TOKENS)


def zimage_template(tok) -> str:
    # as ZImagePipeline renders it, with the prompt "{}"
    return tok.apply_chat_template(
        [{"role": "user", "content": "{}"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def case(name: str, tk_qwen, tk_qwen3):
    """(tokenizer, template with one {}, drop, after) as the pipeline and its family entry have them."""
    if name == "qwenimage":
        return tk_qwen, QWENIMAGE_PROMPT_TEMPLATE, QWENIMAGE_DROP, QWEN_AFTER
    if name == "qwenimage_edit":
        return tk_qwen, edit_template(), QWENIMAGE_EDIT_DROP, QWEN_AFTER
    return tk_qwen3, zimage_template(tk_qwen3), 0, ZIMAGE_AFTER


def encoded(tok, template: str, prompt: str) -> tuple[list[int], int, list[int]]:
    """The templated ids, where the prompt's own tokens start in them, and those tokens."""
    ids = tok(template.format(prompt))["input_ids"]
    prefix = tok(template[: template.index("{}")])["input_ids"]
    own = tok(prompt)["input_ids"]
    # the template ends before a letter with a newline or a special token: nothing merges across it
    assert ids[: len(prefix)] == prefix and ids[len(prefix) : len(prefix) + len(own)] == own
    return ids, len(prefix), own


CASES = ("qwenimage", "qwenimage_edit", "zimage")


# -------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("name", CASES)
def test_window_is_the_prompt_and_positions_index_the_keys(name, tk_qwen, tk_qwen3):
    tok, template, drop, after = case(name, tk_qwen, tk_qwen3)
    prompt = "a red dog on a bench"
    ids, start, own = encoded(tok, template, prompt)
    assert prompt_window(tok, ids, after) == (start, start + len(own))
    a = align_in_template(tok, ids, after, prompt, drop=drop)
    assert [w.text for w in a.words] == ["a", "red", "dog", "on", "a", "bench"]
    assert a.tokens == tuple(tok.convert_ids_to_tokens(ids[drop:]))
    assert a.tokens[a.positions("dog")[0]] == "\u0120dog"
    assert a.positions("a") == [start - drop, start - drop + 4]
    assert not any(w.truncated for w in a.words)
    # the words read off the ids alone are the same
    assert align_in_template(tok, ids, after, None, drop=drop).words == a.words


def test_template_words_are_never_prompt_words(tk_qwen):
    # "color", "the", "of" and "image" are also words of the system prompt, "user" of the template
    prompt = "the color of the user image"
    ids, start, own = encoded(tk_qwen, QWENIMAGE_PROMPT_TEMPLATE, prompt)
    a = align_in_template(tk_qwen, ids, QWEN_AFTER, prompt, drop=QWENIMAGE_DROP)
    assert [w.text for w in a.words] == split_words(prompt)
    assert [p for w in a.words for p in w.positions] == list(range(start - QWENIMAGE_DROP, start - QWENIMAGE_DROP + len(own)))
    assert a.positions("color") == [start - QWENIMAGE_DROP + 1]
    with pytest.raises(WordNotFoundError):
        a.find("assistant")
    with pytest.raises(WordNotFoundError):
        a.find("describe")


def test_vision_tokens_before_the_prompt_are_no_words(tk_qwen):
    prompt = "a blue cat"
    ids, start, own = encoded(tk_qwen, edit_template(), prompt)
    a = align_in_template(tk_qwen, ids, QWEN_AFTER, prompt, drop=QWENIMAGE_EDIT_DROP)
    assert a.tokens[0] == "<|vision_start|>" and a.tokens[VISION_TOKENS + 1] == "<|vision_end|>"
    assert a.positions("a") == [VISION_TOKENS + 2]
    assert [w.text for w in a.words] == ["a", "blue", "cat"]
    # with the text-to-image template text alone the window would open on the vision tokens
    assert prompt_window(tk_qwen, ids, "<|im_start|>user\n")[0] == QWENIMAGE_EDIT_DROP


def test_length_cuts_words_and_missing_template_raises(tk_qwen):
    prompt = "a red dog on a bench"
    ids, start, _ = encoded(tk_qwen, QWENIMAGE_PROMPT_TEMPLATE, prompt)
    a = align_in_template(tk_qwen, ids, QWEN_AFTER, prompt, drop=QWENIMAGE_DROP, length=3)
    assert len(a.tokens) == 3 and a.max_length == 3
    assert [w.text for w in a.words if not w.truncated] == ["a", "red", "dog"]
    assert a.words[-1].truncated and a.words[-1].positions == ()
    with pytest.raises(ValueError, match="not in the encoded prompt"):
        prompt_window(tk_qwen, tk_qwen(prompt)["input_ids"], ("<|vision_end|>", "[INST]"))


def test_capitals_punctuation_and_unknown_words(tk_qwen3):
    template = zimage_template(tk_qwen3)
    prompt = "A Dog, on the xylophone!"
    ids, start, own = encoded(tk_qwen3, template, prompt)
    a = align_in_template(tk_qwen3, ids, ZIMAGE_AFTER, prompt)
    assert [w.text for w in a.words] == ["a", "dog", ",", "on", "the", "xylophone", "!"]
    assert len(a.find("xylophone")[0].positions) > 1  # not in the tiny vocabulary: several byte tokens
    assert [p for w in a.words for p in w.positions] == list(range(start, start + len(own)))


# ------------------------------------------------------------------------------------------ property
SEPS = [" ", " ", " ", ", ", ". ", "  ", " and "]


@st.composite
def prompts(draw):
    items = draw(
        st.lists(
            st.tuples(st.sampled_from(T5_WORDS), st.booleans(), st.sampled_from(SEPS)), min_size=1, max_size=12
        )
    )
    return "".join((w.capitalize() if up else w) + s for w, up, s in items).strip()


@PROPS
@given(prompt=prompts(), name=st.sampled_from(CASES))
def test_property_every_word_found_and_only_prompt_tokens(tk_qwen, tk_qwen3, prompt, name):
    tok, template, drop, after = case(name, tk_qwen, tk_qwen3)
    ids, start, own = encoded(tok, template, prompt)
    a = align_in_template(tok, ids, after, prompt, drop=drop)
    assert [w.text for w in a.words] == split_words(prompt)
    # every prompt token is in exactly one word, in order, and nothing else is: template tokens are
    # never in a word, and positions index the prompt's own tokens among the keys ids[drop:]
    window = list(range(start - drop, start - drop + len(own)))
    assert [p for w in a.words for p in w.positions] == window
    assert [a.tokens[p] for p in window] == tok.convert_ids_to_tokens(own)
    for w in a.words:
        assert tok.decode([ids[drop + p] for p in w.positions]).strip().lower() == w.text
        assert w in a.find(w.text) and set(w.positions) <= set(a.positions(w.text.upper()))
        assert not w.truncated
    assert align_in_template(tok, ids, after, None, drop=drop).words == a.words
