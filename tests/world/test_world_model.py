"""The shipped shapes-world model: present, small, loads offline through StableDiffusionPipeline."""

from __future__ import annotations

import json

import pytest

from daamkit.world import ModelNotFoundError, default_model_path


def _model_or_skip():
    try:
        return default_model_path()
    except ModelNotFoundError as e:  # pragma: no cover - a checkout without the weights
        pytest.skip(str(e))


def test_default_model_path_error_is_clear(tmp_path, monkeypatch):
    import daamkit.world as world

    monkeypatch.setattr(world, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(ModelNotFoundError, match="daamkit world train"):
        world.default_model_path()


def test_shipped_model_layout_and_size():
    path = _model_or_skip()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["requires_safety_checker"] is False
    weights = list(path.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < 30e6


def test_shipped_model_loads_and_generates():
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = _model_or_skip()
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle",
        num_inference_steps=8,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    arr = np.asarray(img)
    assert arr.shape == (64, 64, 3) and arr.std() > 5  # not a blank image


def test_swap_word_replaces_only_the_word_of_its_role():
    import numpy as np

    from daamkit.world.quality import _swap_word
    from daamkit.world.scenes import COLORS, PLURALS, SHAPES, make_scene

    rng = np.random.default_rng(0)
    plural_seen = 0
    for seed in range(40):
        s = make_scene(seed, "train")
        for role, kind in (("noun", set(SHAPES) | set(PLURALS.values())), ("color", set(COLORS))):
            swapped = _swap_word(s, role, rng).replace(",", " ,").split()
            orig = s.caption.replace(",", " ,").split()
            diff = [k for k, (a, b) in enumerate(zip(orig, swapped, strict=True)) if a != b]
            assert len(diff) == 1, (s.caption, swapped)
            a, b = orig[diff[0]], swapped[diff[0]]
            assert a in kind and b in kind and (a in PLURALS.values()) == (b in PLURALS.values())
            first = next(w.text for w in s.words if w.role == role)
            assert a == first  # the first word of the role is the one swapped
            plural_seen += role == "noun" and a in PLURALS.values()
    assert plural_seen > 0


def test_word_sensitivity_sees_that_the_model_relies_on_colour_and_shape_words():
    """The swap test must register a word the model uses: the shipped model draws the requested colour
    in ~98% of images, so denoising with the wrong colour word has to cost clearly more. It also reads
    the shape word (an earlier model with a 1-layer text encoder did not: +0% at every t, see
    docs/world/experiments.md)."""
    _model_or_skip()
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world.quality import word_sensitivity

    pipe = load_pipeline(default_model_path(), dtype="float32")
    res = word_sensitivity(pipe, roles=("color", "noun"), n=6, timesteps=(300, 500))
    assert res["n"] == 6 and set(res["mse"]) == {300, 500}
    assert all(res["mse"][t] > 0 for t in (300, 500))
    assert res["color"][300] > 0.3 and res["color"][500] > 0.3
    assert res["noun"][300] > 0.2 and res["noun"][500] > 0.2


def test_shipped_model_draws_the_requested_shape_of_a_single_object():
    """Generation, not maps: for one-object held-out captions (held-out pairs and templates included)
    the segmenter must find the requested shape in most images. Chance is 1/6; the autoencoder's own
    round trip keeps ~96% of shapes, and the shipped model measured 24 of 27 on the eval's one-object
    captions (docs/model_card.md)."""
    _model_or_skip()
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world.quality import evaluate_generation
    from daamkit.world.scenes import make_heldout_scene

    pipe = load_pipeline(default_model_path(), dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    scenes = [s for s in (make_heldout_scene(i) for i in range(200, 400)) if len(s.objects) == 1][:16]
    assert len(scenes) == 16
    _, recs, _ = evaluate_generation(pipe, scenes, progress=False)
    right = [r["caption"] for r in recs if r["shapes_correct"] == 1.0]
    assert len(right) >= 12, [r["caption"] for r in recs if r["shapes_correct"] < 1.0]


def test_word_similarity_is_one_for_one_word_and_separates_colours():
    _model_or_skip()
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world.quality import word_similarity

    pipe = load_pipeline(default_model_path(), dtype="float32")
    sim = word_similarity(pipe)
    assert set(sim) == {"noun", "color"} and all(-1 <= v <= 1 for v in sim.values())
    assert sim["color"] < 0.5  # the model draws the requested colours, so its encoder must tell them apart
    # the check itself: a tokenizer that maps every shape to one id gives similarity 1
    circle = pipe.tokenizer("circle", add_special_tokens=False).input_ids

    class OneShape:
        model_max_length = pipe.tokenizer.model_max_length

        def __call__(self, captions, **kw):
            out = pipe.tokenizer([c.split()[0] + " " + c.split()[1] + " circle" for c in captions], **kw)
            assert len(circle) == 1
            return out

    class Same:
        tokenizer, text_encoder = OneShape(), pipe.text_encoder

    assert word_similarity(Same())["noun"] > 0.999


def test_autoencoder_ceiling_scores_round_trips_and_exact_renders():
    """The ceiling check must pass the exact renders almost always (the judge's own error is small) and
    find the shipped VAE's round trips about as good (it measured 0.963 vs 0.988 shapes per object on 200
    held-out scenes; on a handful of scenes the judge's own misses can put the round trip ahead); a
    broken encode/decode would score near zero."""
    _model_or_skip()
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world.quality import autoencoder_ceiling, heldout_captions

    pipe = load_pipeline(default_model_path(), dtype="float32")
    scenes = heldout_captions(16, 10_000)
    vae_rt, exact = autoencoder_ceiling(pipe, scenes, batch=8)
    assert vae_rt["all"]["n"] == exact["all"]["n"] == 16
    assert exact["all"]["shapes_correct"] >= 0.9 and exact["all"]["all_objects_drawn"] >= 0.9
    assert vae_rt["all"]["all_objects_drawn"] >= 0.8
    assert 0.6 <= vae_rt["all"]["shapes_correct"] <= exact["all"]["shapes_correct"] + 0.1
    assert 0 <= vae_rt["all"]["all_shapes_right"] <= 1


def test_restoration_from_lightly_noised_renders_keeps_the_scene():
    """Sampled back from a lightly noised exact render (strength 0.1), or estimated in one step from
    t = 100, a scene keeps its objects and nearly all its shapes (the shipped model measured 0.90 all
    shapes right one step from t = 100 on 100 held-out scenes, the autoencoder alone 0.905); a wrong
    latent scale, noise level or decode in either path would leave blobs or noise."""
    _model_or_skip()
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world.quality import heldout_captions, one_step_restoration, restoration

    pipe = load_pipeline(default_model_path(), dtype="float32")
    scenes = heldout_captions(12, 10_000)
    sampled = restoration(pipe, scenes, strengths=(0.1,), batch=12)[0.1]["all"]
    one_step = one_step_restoration(pipe, scenes, timesteps=(100,))[100]["all"]
    for res in (sampled, one_step):
        assert res["n"] == 12
        assert res["all_objects_drawn"] >= 0.8, res
        assert res["shapes_correct"] >= 0.75, res


def test_model_names_resolve_to_shipped_folders_and_unknown_names_are_refused():
    from daamkit.world import WORLD_MODELS, model_path

    _model_or_skip()
    assert model_path("world") == default_model_path()
    assert set(WORLD_MODELS) >= {"world"}
    with pytest.raises(ModelNotFoundError, match="no shipped shapes-world model is called 'wrld'.*world"):
        model_path("wrld")


def test_load_pipeline_takes_a_model_name_unless_a_local_path_has_that_name(tmp_path, monkeypatch):
    from daamkit.jobs.pipeline import ModelLoadError, load_pipeline

    _model_or_skip()
    pipe = load_pipeline("world", progress=False)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "world").mkdir()  # the user's own folder of that name is what they mean
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_pipeline("world", progress=False)
