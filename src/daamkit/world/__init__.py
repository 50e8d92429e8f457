"""The shapes world: procedural scenes with exact masks, a training script and the shipped model.

>>> from daamkit.world import make_scene, default_model_path
>>> scene = make_scene(0, "test")            # image, caption, per-object and per-word masks
>>> folder = default_model_path()            # the shipped diffusers pipeline folder

Training lives in :mod:`daamkit.world.train` (``train(Recipe(...))``, whose command line is
``daamkit world train``); it imports torch/diffusers lazily, so importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path

from daamkit.errors import DaamkitError
from daamkit.world.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_TEMPLATES,
    IMAGE_SIZE,
    PLURALS,
    SHAPES,
    TEMPLATES,
    TRAIN_TEMPLATES,
    CaptionWord,
    Scene,
    SceneObject,
    is_heldout,
    make_heldout_scene,
    make_scene,
    render,
    render_batch,
    shape_polygon,
)
from daamkit.world.segment import (
    Component,
    GenerationCheck,
    RequestedObject,
    classify_pixels,
    classify_shape,
    connected_components,
    drawn_masks,
    generation_accuracy,
    parse_caption,
    segment,
    split_component,
)


class ModelNotFoundError(DaamkitError, FileNotFoundError):
    """The shipped shapes-world model folder is missing or incomplete."""


#: The shapes-world models shipped with daamkit: name -> its folder beside this file. "world" was trained
#: with a cross-attention grounding loss; the same recipe without it is not shipped, because it draws the
#: requested shapes too rarely (docs/model_card.md gives its figures).
WORLD_MODELS = {"world": "model"}


def model_path(name: str = "world") -> Path:
    """The folder of the shipped shapes-world model ``name`` (one of :data:`WORLD_MODELS`), for
    ``StableDiffusionPipeline.from_pretrained(model_path(name), local_files_only=True)``.

    Raises ModelNotFoundError if the name is unknown or its folder is missing or incomplete.
    """
    if name not in WORLD_MODELS:
        raise ModelNotFoundError(f"no shipped shapes-world model is called {name!r}; the shipped models are "
                                 f"{', '.join(WORLD_MODELS)}")
    path = Path(__file__).resolve().parent / WORLD_MODELS[name]
    needed = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise ModelNotFoundError(
            f"the shipped shapes-world model {name!r} is missing or incomplete at {path} (missing: "
            f"{', '.join(missing)}). Train one with `daamkit world train --out runs/world_train` and copy "
            "runs/world_train/model there, or reinstall daamkit with its package data."
        )
    return path


def default_model_path() -> Path:
    """The shipped shapes-world pipeline folder (``daamkit/world/model``): ``model_path("world")``."""
    return model_path("world")


__all__ = [
    "WORLD_MODELS",
    "model_path",
    "BACKGROUNDS",
    "COLORS",
    "HELDOUT_PAIRS",
    "HELDOUT_TEMPLATES",
    "IMAGE_SIZE",
    "PLURALS",
    "SHAPES",
    "TEMPLATES",
    "TRAIN_TEMPLATES",
    "CaptionWord",
    "Component",
    "GenerationCheck",
    "ModelNotFoundError",
    "RequestedObject",
    "Scene",
    "SceneObject",
    "classify_pixels",
    "classify_shape",
    "connected_components",
    "default_model_path",
    "drawn_masks",
    "generation_accuracy",
    "is_heldout",
    "make_heldout_scene",
    "make_scene",
    "parse_caption",
    "render",
    "render_batch",
    "segment",
    "shape_polygon",
    "split_component",
]
