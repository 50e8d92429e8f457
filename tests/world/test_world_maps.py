"""The shipped shapes-world model's maps are *right*: on a fixed set of prompts and seeds, each noun's
and colour word's map overlaps its own drawn object more than any other drawn object."""

from __future__ import annotations

import pytest
import torch

from daamkit import trace
from daamkit.cli import main
from daamkit.world import ModelNotFoundError, default_model_path, drawn_masks, generation_accuracy

CASES = [
    ("a red circle and a blue square", 0),
    ("a green triangle above a yellow star", 1),
    ("a purple heart next to an orange cross", 2),
    ("a blue star and a red triangle", 3),
    ("a yellow circle below a green square", 4),
    ("an orange heart and a blue circle", 5),
]


@pytest.fixture(scope="module")
def world_pipe():
    try:
        path = default_model_path()
    except ModelNotFoundError as e:  # pragma: no cover - a checkout without the weights
        pytest.skip(str(e))
    from daamkit.jobs.pipeline import load_pipeline

    return load_pipeline(path, dtype="float32")


@pytest.fixture(scope="module")
def generated(world_pipe):
    """Each case's image and word maps, generated once for both tests (in one batch, each from its seed)."""
    prompts = [prompt for prompt, _ in CASES]
    with trace(world_pipe) as tc:
        images = world_pipe(
            prompts,
            num_inference_steps=20,
            guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(seed) for _, seed in CASES],
        ).images
        return [(prompt, image, tc.heat_maps(i)) for i, (prompt, image) in enumerate(zip(prompts, images, strict=True))]


def _own_vs_other(generated, kinds):
    """For every word of ``kinds`` whose object and at least one other object were drawn: does the
    map's mean normalised heat over its own object beat its mean over every other drawn object?"""
    from daamkit.world import COLORS, PLURALS, SHAPES

    nouns = set(SHAPES) | set(PLURALS.values())
    results = []
    for prompt, image, maps in generated:
        check = generation_accuracy(image, prompt)
        objects = [m.mask for m in check.matches if m is not None]
        for word, per_occurrence in drawn_masks(image, prompt).items():
            kind = "noun" if word in nouns else "colour" if word in COLORS else None
            if kind not in kinds:
                continue
            for k, own in enumerate(per_occurrence):
                others = [o for o in objects if own is not None and not (o == own).all()]
                if own is None or not others:
                    continue
                heat = maps.word(word, occurrence=k).normalized().numpy()
                own_score = float(heat[own].mean())
                best_other = max(float(heat[o].mean()) for o in others)
                results.append(
                    (prompt, word, round(own_score, 3), round(best_other, 3), own_score > best_other)
                )
    return results


def test_colour_word_maps_sit_on_their_own_object(generated):
    results = _own_vs_other(generated, {"colour"})
    assert len(results) >= 8, f"too few colour words with two drawn objects to judge: {results}"
    wins = sum(r[-1] for r in results)
    assert wins / len(results) >= 0.9, [r for r in results if not r[-1]]


def test_noun_maps_sit_on_their_own_object(generated):
    results = _own_vs_other(generated, {"noun"})
    assert len(results) >= 8, f"too few nouns with two drawn objects to judge: {results}"
    wins = sum(r[-1] for r in results)
    assert wins / len(results) >= 0.85, [r for r in results if not r[-1]]


def test_demo_writes_its_outputs(world_pipe, tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["demo", "a red circle and a blue square", "--steps", "8", "--out", str(out), "--no-progress"])
        == 0
    )
    for name in (
        "image.png",
        "grid.png",
        "record.json",
        "record.safetensors",
        "overlays/circle.png",
        "overlays/red.png",
        "maps/square.png",
    ):
        assert (out / name).is_file(), name
    assert "wrote" in capsys.readouterr().out
