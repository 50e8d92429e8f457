"""Concept maps (``method="concept"``) on the joint-attention image families beyond SD3/Flux: the image
is unchanged, every concept gets a finite map on the image grid, and each block's concept stream is
what the model's own block computes when handed the concepts as its text."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_checks import assert_restored, pipeline_state, region_mask
from torch.overrides import TorchFunctionMode

from daamkit import UnsupportedPipelineError, trace
from daamkit.methods.concept import CONCEPT_BLOCKS, ConceptMethod
from daamkit.testing.families import auraflow, chroma, cogview4, flux2, hidream, lumina2, qwenimage, zimage
from daamkit.testing.tokenizers import clip_tokenizer, t5_tokenizer

PROMPT = "a red dog on a bench"
CONCEPTS = ["dog", "tree", "traffic light"]
FAMILIES = ["chroma", "flux2", "klein", "qwenimage", "cogview4", "auraflow", "zimage", "lumina2", "hidream"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The family tests' tiny pipelines, built once (each in well under a second)."""
    root = tmp_path_factory.mktemp("concept_tokenizers")
    t5_tokenizer(str(root / "t5"))
    flux2.mistral3_tokenizer(root / "mistral")
    flux2.qwen3_tokenizer(root / "qwen3")
    qwenimage.qwen2_5_vl_tokenizer(root / "qwen2_5_vl")
    cogview4.glm4_tokenizer(root / "glm4")
    auraflow.pile_t5_tokenizer(root / "pile_t5")
    zimage.qwen3_tokenizer(root / "zimage_qwen3")
    lumina2.gemma_tokenizer(root / "gemma")
    hidream.llama3_tokenizer(root / "llama3")
    clip_tokenizer(root / "clip")
    clip_tokenizer(root / "clip_2", pad_token="!")
    built = {
        "chroma": chroma.tiny_chroma(str(root / "t5")),
        "flux2": flux2.tiny_flux2(str(root / "mistral")),
        "klein": flux2.tiny_flux2_klein(str(root / "qwen3")),
        "qwenimage": qwenimage.tiny_qwenimage(root / "qwen2_5_vl"),
        "cogview4": cogview4.tiny_cogview4(root / "glm4"),
        "auraflow": auraflow.tiny_auraflow(root / "pile_t5"),
        "zimage": zimage.tiny_zimage(root / "zimage_qwen3"),
        "lumina2": lumina2.tiny_lumina2(root / "gemma"),
        "hidream": hidream.tiny_hidream(root / "clip", root / "clip_2", root / "t5", root / "llama3"),
    }
    for p in built.values():
        p.set_progress_bar_config(disable=True)
        run(p, steps=1)  # transformers' encoders add their output recorders (hooks) at a first call
    return built


def no_cfg(name: str) -> dict:
    """One conditional row per call (Z-Image guides whenever guidance_scale > 0)."""
    return {"guidance_scale": 0.0 if name == "zimage" else 1.0}


def run(pipe, steps=2, **kw):
    return pipe(prompt=PROMPT, num_inference_steps=steps, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("name", FAMILIES)
def test_concept_maps_leave_the_image_unchanged_and_map_every_concept(pipes, name):
    pipe = pipes[name]
    ref = run(pipe)
    before = pipeline_state(pipe)
    with trace(pipe, concepts=CONCEPTS) as tc:
        out = run(pipe)
        cm = tc.heat_maps(0, method="concept")
        words = tc.heat_maps(0)
    assert np.array_equal(out, ref), "concept maps changed the image"
    assert_restored(pipe, before)
    assert cm.words == ["dog", "tree", "traffic", "light"]
    assert cm.word("traffic light").positions == (2,)
    assert cm.maps.shape == (3, *words.maps.shape[1:])
    assert torch.isfinite(cm.maps).all()
    torch.testing.assert_close(cm.maps.sum(0), torch.ones(cm.maps.shape[1:]))  # softmax over the concepts
    assert not torch.allclose(cm.maps[0], cm.maps[1])
    assert cm.meta["family"] == ("flux2" if name == "klein" else name) and cm.meta["method"] == "concept"


def _block_inputs(pipe, spec):
    """Forward pre-hooks keeping each joint block's arguments (by name) of its first call."""
    seen: dict[str, dict] = {}
    handles = []
    for i, block in enumerate(getattr(pipe.transformer, spec.blocks)):
        sig = inspect.signature(block.forward)

        def keep(mod, args, kwargs, name=f"{spec.blocks}.{i}", sig=sig):
            seen.setdefault(name, dict(sig.bind_partial(*args, **kwargs).arguments))

        handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    return seen, handles


def _as_text(family: str, kw: dict, concepts: torch.Tensor) -> dict:
    """The block's arguments with the concepts as its whole text: the text's rotary table rows and
    masks replaced as the concept stream takes them (documented in ``CONCEPT_BLOCKS``)."""
    kw = dict(kw, encoder_hidden_states=concepts)
    k = concepts.shape[1]
    if family in ("chroma", "flux2"):
        cos, sin = kw["image_rotary_emb"]
        n_text = cos.shape[0] - kw["hidden_states"].shape[1]
        # concepts at text position 0: no rotation (Chroma's text ids are all 0 already)
        kw["image_rotary_emb"] = (torch.cat([torch.ones_like(cos[:k]), cos[n_text:]]),
                                  torch.cat([torch.zeros_like(sin[:k]), sin[n_text:]]))
        kw.pop("attention_mask", None)
    elif family == "qwenimage":
        img, txt = kw["image_rotary_emb"]
        kw["image_rotary_emb"] = (img, txt[:1].expand(k, -1))  # every concept at the first text position
        kw["encoder_hidden_states_mask"] = None
    elif family == "cogview4":
        kw["attention_mask"] = None
    elif family == "zimage":  # one sequence: [image and its pads, concepts], concepts at the caption's first position
        del kw["encoder_hidden_states"]
        h, w = kw.pop("grid")
        start = -(-h * w // 32) * 32
        freqs = kw["freqs_cis"]
        kw.update(x=torch.cat([kw["x"][:, :start], concepts], 1), attn_mask=None,
                  freqs_cis=torch.cat([freqs[:, :start], freqs[:, start:start + 1].expand(-1, k, -1)], 1))
    elif family == "hidream":  # text positions are all 0: the first k rows of the text's rotary table
        kw["image_rotary_emb"] = kw["image_rotary_emb"][:, : kw["hidden_states"].shape[1] + k]
    elif family == "lumina2":  # one sequence: [concepts, image], concepts at the caption's first position
        del kw["encoder_hidden_states"]
        h, w = kw.pop("grid")
        x, rope = kw["hidden_states"], kw["image_rotary_emb"]
        image = slice(x.shape[1] - h * w, x.shape[1])  # one row: [caption, image], no padding
        kw.update(hidden_states=torch.cat([concepts, x[:, image]], 1), attention_mask=None,
                  image_rotary_emb=torch.cat([rope[:, :1].expand(-1, k, -1), rope[:, image]], 1))
    return kw


def _text_output(family: str, out, k: int) -> torch.Tensor:
    """The concepts' rows of a block's output: (text, image) for most, (image, text) for CogView4, the
    last ``k`` tokens of Z-Image's one sequence."""
    if family == "zimage":
        return out[:, -k:]
    if family == "lumina2":
        return out[:, :k]
    if family == "hidream":  # (image, text) as well
        return out[1]
    return out[1] if family == "cogview4" else out[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_concept_stream_is_the_blocks_own_text_stream_on_the_concepts(pipes, name):
    """Independent of the family adapter: each block's own forward, given the concepts' input state as
    its text (and the image the real call gave it), returns the text output the side stream computed."""
    pipe = pipes[name]
    family = "flux2" if name == "klein" else name
    spec = CONCEPT_BLOCKS[family]
    seen, handles = _block_inputs(pipe, spec)
    try:
        with trace(pipe, concepts=CONCEPTS) as tc:
            run(pipe, steps=1, **no_cfg(name))
            capture = tc._concept_capture
    finally:
        for h in handles:
            h.remove()
    assert set(capture.states) == set(seen)
    for block_name, kw in seen.items():
        block = pipe.transformer.get_submodule(block_name)
        concepts = capture.inputs[block_name]
        if family in ("zimage", "lumina2"):
            kw = dict(kw, grid=tc.generation.call.latent_hw)
        with torch.no_grad():
            out = block(**_as_text(family, kw, concepts))
        text = _text_output(family, out, concepts.shape[1])
        torch.testing.assert_close(capture.states[block_name], text, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(capture.states[block_name], capture.inputs[block_name])


def test_concepts_are_encoded_from_their_own_tokens_inside_the_template(pipes):
    """Qwen-Image wraps the text in a chat template and drops its system part: a concept's embedding is
    the mean of the rows of its own tokens, not of the template's."""
    pipe = pipes["qwenimage"]
    emb = pipe.encode_prompt(prompt="dog", device="cpu")[0][0]
    with trace(pipe, concepts=["dog"]) as tc:
        run(pipe, steps=1)
        got = tc._methods["concept"].capture.embeds
    rows = [i for i in range(emb.shape[0]) if torch.allclose(emb[i].float(), got[0])]
    template_rows = emb.shape[0] - 1
    assert got.shape == (1, emb.shape[1]) and template_rows >= 1
    assert rows, "the concept's embedding is not one of its token rows"


def test_a_model_without_joint_attention_is_told_which_families_have_concept_maps(clip_tokenizer_dir):
    from daamkit.testing.pipelines import tiny_sd

    pipe = tiny_sd(clip_tokenizer_dir)
    before = pipeline_state(pipe)
    with pytest.raises(UnsupportedPipelineError, match=r"\(sd3, flux, chroma, .*hidream.*\); this pipeline is a unet"):
        trace(pipe, concepts=["dog"])
    assert_restored(pipe, before)
    assert set(CONCEPT_BLOCKS) <= set(ConceptMethod.families)


class _HandSetAttention(TorchFunctionMode):
    """Hand-set q and k where the model attends (after its norms and rotary embeddings), for every
    family alike. ``joint`` (the block's attention call, queries = keys, pushed on the attention module
    so that it runs before daamkit reads the call): the image queries are +u inside ``inside`` and -u
    outside, the text keys +u at ``plus`` and -u at ``minus`` (0 elsewhere), the image keys 0; the
    region then reads the value of ``plus``, the rest that of ``minus``. Otherwise (around the whole
    pipeline call) only the concept stream's call (fewer queries than keys) is set: each concept's
    query and key are its own axis, so a concept attends to itself alone."""

    def __init__(self, joint: bool, inside: torch.Tensor, concepts: int = 2):
        super().__init__()
        self.joint, self.inside, self.concepts = joint, inside, concepts
        self.image, self.plus, self.minus = slice(0, 0), [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            # diffusers' dispatcher passes q, k, v by keyword, other processors by position
            args, kwargs = (), {**dict(zip(("query", "key", "value"), args, strict=False)), **kwargs, **dict(
                zip(("attn_mask", "dropout_p", "is_causal"), args[3:], strict=False))}
            q, k = kwargs["query"], kwargs["key"]
            g = (30.0 * q.shape[-1] ** 0.5) ** 0.5  # q.k = g^2, scaled by 1/sqrt(d): 30, a one-hot softmax
            if self.joint and q.shape[2] == k.shape[2]:
                q, k = torch.zeros_like(q), torch.zeros_like(k)
                q[:, :, self.image, 0] = torch.where(self.inside, g, -g).to(q.dtype)
                k[:, :, self.plus, 0] = g
                k[:, :, self.minus, 0] = -g
                kwargs.update(query=q, key=k)
            elif not self.joint and q.shape[2] == self.concepts < k.shape[2]:
                q, k = torch.zeros_like(q), torch.zeros_like(k)
                for j in range(self.concepts):
                    q[:, :, j, 1 + j] = g
                    k[:, :, j, 1 + j] = g
                kwargs.update(query=q, key=k)
        return func(*args, **kwargs)


class _SelfOnly(TorchFunctionMode):
    """Every query attends to its own key alone (an identity mask); entered and left by module hooks."""

    def enter(self, *hook_args) -> None:
        self.__enter__()

    def exit(self, *hook_args) -> None:
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            args, kwargs = (), {**dict(zip(("query", "key", "value", "attn_mask"), args, strict=False)), **kwargs}
            n = kwargs["query"].shape[2]
            kwargs["attn_mask"] = torch.eye(n, dtype=torch.bool)
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_concept_equal_to_a_prompt_word_peaks_where_that_word_is_read(pipes, name):
    """Concepts "dog" and "bench" are the prompt's own encoder rows of those words, so in the first block
    their values are the prompt tokens' values. Hand-set attention makes the region read the value of
    "dog" and the rest that of "bench", and each concept attend to itself: the map of a pixel is then
    v(read word) . v(concept), whose dog-minus-bench difference is larger inside than outside by
    |v(dog) - v(bench)|^2 > 0. That contrast is what is sound to expect (not that "dog" wins inside:
    v(dog) . v(bench) may exceed |v(dog)|^2), so the softmaxed "dog" map is higher everywhere inside
    the region than anywhere outside it, and the "bench" map the other way round."""
    pipe = pipes[name]
    family = "flux2" if name == "klein" else name
    first = f"{CONCEPT_BLOCKS[family].blocks}.0.{CONCEPT_BLOCKS[family].attn}"
    with trace(pipe, layers=[first]) as tc:
        run(pipe, steps=1, **no_cfg(name))
        words = tc.heat_maps(0)
    embeds = pipe.encode_prompt(prompt=PROMPT, device="cpu")[0][0]
    # the first encoder's rows only (HiDream's keys hold the words again in its Llama parts)
    dog, bench = ([p for p in words.word(x).positions if p < embeds.shape[0]] for x in ("dog", "bench"))
    concept_embeds = torch.stack([embeds[dog].float().mean(0), embeds[bench].float().mean(0)])
    h, w = words.maps.shape[1:]
    inside = region_mask((h, w))
    joint, concepts = _HandSetAttention(True, inside), _HandSetAttention(False, inside)

    def push(module, args, kwargs):
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if name == "hidream":  # [image, text: T5 first]
            joint.image, lead = slice(0, h * w), args[0].shape[1]
        elif ctx is None:  # Z-Image: [image padded to a multiple of 32, caption]
            joint.image, lead = slice(0, h * w), -(-h * w // 32) * 32
        elif name == "lumina2":  # one row [caption, image]: the text keys are the caption
            joint.image, lead = slice(ctx.shape[1] - h * w, ctx.shape[1]), 0
        else:  # [text, image]; the text keys daamkit names are the text's last (AuraFlow's registers lead)
            joint.image, lead = slice(ctx.shape[1], ctx.shape[1] + h * w), ctx.shape[1] - len(words.tokens)
        joint.plus, joint.minus = [lead + p for p in dog], [lead + p for p in bench]
        joint.__enter__()

    # Z-Image refines its caption alone first: there every token attends to itself only, so that the
    # concepts' refined state is the prompt words' one
    refiners = [_SelfOnly() for _ in getattr(pipe.transformer, "context_refiner", ())]

    attn = pipe.transformer.get_submodule(first)
    with trace(pipe, layers=[first], concepts=["dog", "bench"], concept_embeds=concept_embeds) as tc:
        # after the trace's hooks: pushed last (innermost), popped first
        handles = [attn.register_forward_pre_hook(push, with_kwargs=True),
                   attn.register_forward_hook(lambda *a: joint.__exit__(None, None, None), prepend=True,
                                              always_call=True)]
        for layer, mode in zip(getattr(pipe.transformer, "context_refiner", ()), refiners, strict=True):
            handles += [layer.register_forward_pre_hook(mode.enter),
                        layer.register_forward_hook(mode.exit, prepend=True, always_call=True)]
        try:
            with concepts:
                run(pipe, steps=1, **no_cfg(name))
        finally:
            for handle in handles:
                handle.remove()
        cm = tc.heat_maps(0, method="concept")
    m_dog, m_bench = cm.word("dog").value, cm.word("bench").value
    grid = inside.reshape(h, w)
    assert m_dog[grid].min() > m_dog[~grid].max()
    assert m_bench[grid].max() < m_bench[~grid].min()
