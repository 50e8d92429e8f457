"""One traced generation job: run the pipeline inside a trace, build records, write the outputs.

:func:`traced_generation` is the job itself (pipeline call inside a trace, heat maps per image), shared by
``daamkit generate``/``demo``, the batch runner, the web app, ``daamkit eval`` and the entanglement
analysis; :func:`generate` builds the records every front end writes.

Video pipelines (those whose call takes ``num_frames``) return ``frames`` instead of ``images``: the job
then gives each video's frames as a uint8 array (frames, H, W, 3) where an image pipeline gives a PIL
image, the heat maps carry the time axis, and :func:`write_outputs` writes videos instead of pictures.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from daamkit.errors import InputError
from daamkit.heatmap import GlobalHeatMap
from daamkit.io.record import RunRecord
from daamkit.methods.base import jsonable
from daamkit.metrics import DEFAULT_THRESHOLD, threshold_mask
from daamkit.relation import RelationQuery
from daamkit.trace import trace


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """'512' -> (512, 512); '768x512' -> width 768, height 512. Returns (height, width)."""
    if not text:
        return None, None
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise InputError(f"--size must be N or WIDTHxHEIGHT (e.g. 512 or 768x512), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise InputError(f"--size must be positive multiples of 8, got {text!r}")
    return h, w


def parse_steps(text: str | None) -> range | list[int] | None:
    """'0:10' -> range(0, 10); '0,5,9' -> [0, 5, 9]."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":")
            steps: range | list[int] = range(int(a or 0), int(b))
        else:
            steps = [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--steps-range must be START:END or a comma list of step indices, got {text!r}") from None
    if not steps or min(steps) < 0:
        raise InputError(f"--steps-range must select step indices from 0 up (START < END), got {text!r}")
    return steps


@dataclass
class GenerateOptions:
    steps: int = 30
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    trace: dict[str, Any] = field(default_factory=dict)  # options of daamkit.trace()
    progress: bool = True
    num_frames: int | None = None  # video pipelines: frames to generate (None: the pipeline's default)
    fps: float | None = None  # video pipelines: frames per second of the written videos (None: the model's)
    open_vocabulary: list[str] = field(default_factory=list)  # words for OVAM maps, need not be in the prompt
    relations: list[str] = field(default_factory=list)  # relation kinds to record ("image->image", "text->text")
    query: tuple[float, float] | None = None  # image->image: the point (y, x) in pixels
    query_box: tuple[float, float, float, float] | None = None  # image->image: the box (y0, x0, y1, x1) in pixels

    def check(self) -> None:
        """Raise :class:`InputError` for a value no pipeline could use, before anything is loaded."""
        for name in ("steps", "num_images_per_prompt"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a whole number of at least 1, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**64:
            raise InputError(f"seed must lie in 0 .. 2**64-1, got {self.seed}")
        if not math.isfinite(self.guidance_scale):
            raise InputError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % 8):
                raise InputError(f"{name} must be a positive multiple of 8 pixels, got {v}")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < 1):
            raise InputError(f"num_frames must be a whole number of at least 1, got {self.num_frames!r}")
        if self.fps is not None:
            from daamkit.video import MAX_FPS

            if not isinstance(self.fps, (int, float)) or not 0 < self.fps <= MAX_FPS:
                raise InputError(f"fps must lie in (0, {MAX_FPS:g}] frames per second, got {self.fps!r}")
        if any(not str(w).strip() for w in self.open_vocabulary):
            raise InputError(f"open_vocabulary holds an empty word: {self.open_vocabulary}")
        if len(set(self.open_vocabulary)) != len(self.open_vocabulary):
            raise InputError(f"open_vocabulary words must be distinct, got {self.open_vocabulary}")
        self.relation_query()  # checks the relations and their query
        if self.trace:
            from daamkit.aggregate import AggregationConfig

            AggregationConfig(**{k: v for k, v in self.trace.items() if k in AggregationConfig.__dataclass_fields__})

    def relation_query(self) -> RelationQuery | None:
        """The image->image query (None without one); :class:`InputError` for an unknown or repeated
        relation, an image->image relation without exactly one query, or a query without it."""
        from daamkit.relation import RELATIONS

        unknown = [k for k in self.relations if k not in RELATIONS]
        if unknown:
            raise InputError(f"unknown relation {unknown[0]!r}: use {' or '.join(RELATIONS)} (comma-separated)")
        if len(set(self.relations)) != len(self.relations):
            raise InputError(f"relations must be distinct, got {self.relations}")
        if self.query is not None and self.query_box is not None:
            raise InputError("give the image->image query as a point or as a box, not both")
        given = self.query is not None or self.query_box is not None
        if "image->image" not in self.relations:
            if given:
                raise InputError("a query names where an image->image relation looks from: add the image->image "
                                 "relation (--relations image->image)")
            return None
        if not given:
            raise InputError("the image->image relation needs a query: a point (--query X,Y) or a box "
                             "(--query-box X0,Y0,X1,Y1) in pixels of the generated image")
        if self.query is not None:
            y, x = self.query
            if not (math.isfinite(y) and math.isfinite(x)) or y < 0 or x < 0:
                raise InputError(f"the query point (x={x:g}, y={y:g}) must lie on the image: pixels from 0 up")
            return RelationQuery(point=(float(y), float(x)))
        assert self.query_box is not None
        return RelationQuery(box=tuple(float(v) for v in self.query_box))  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress")
        d["trace"] = jsonable(d["trace"])
        for key in ("num_frames", "fps"):  # an image's settings stay as they were before videos
            if d[key] is None:
                d.pop(key)
        if not d["open_vocabulary"]:
            d.pop("open_vocabulary")  # records of runs without OVAM stay as they were
        for key in ("relations", "query", "query_box"):  # nor do those of runs without relations
            if not d[key]:
                d.pop(key)
            else:
                d[key] = list(d[key])
        return d


def make_generators(pipe: Any, seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per seed on the pipeline's device (the CPU for MPS pipelines)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    return [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]


def _call_parameters(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def is_video_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` makes videos: its call takes ``num_frames`` (Wan, CogVideoX, HunyuanVideo, LTX,
    AnimateDiff, ...)."""
    return "num_frames" in _call_parameters(pipe)


def traced_generation(
    pipe: Any,
    prompts: Sequence[str],
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int | None = None,
    trace_options: dict[str, Any] | None = None,
    num_frames: int | None = None,
) -> list[tuple[Any, GlobalHeatMap]]:
    """:func:`traced_generation_maps` with the DAAM maps only."""
    return [(image, maps["daam"]) for image, maps in traced_generation_maps(
        pipe, prompts, generator=generator, steps=steps, guidance_scale=guidance_scale, height=height, width=width,
        negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt, trace_options=trace_options,
        num_frames=num_frames,
    )]


def traced_generation_maps(
    pipe: Any,
    prompts: Sequence[str],
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int | None = None,
    trace_options: dict[str, Any] | None = None,
    num_frames: int | None = None,
) -> list[tuple[Any, dict[str, Any]]]:
    """The traced generation job: one pipeline call for ``prompts`` inside :func:`daamkit.trace`.

    Returns ``(image, heat maps)`` per image, in the pipeline's order (prompt by prompt, then image by
    image). ``generator`` is one generator for the call or one per prompt (diffusers then draws each
    image's noise from its own generator, so an image does not depend on the batch it is in).
    ``height``/``width``/``negative_prompt``/``num_images_per_prompt`` are passed on only when given
    (None: the pipeline's default); a single negative prompt is repeated for every prompt. The maps
    are those of every method the trace records, by method name (``"daam"`` always; ``"ovam"`` when
    ``trace_options`` has ``open_vocabulary``), and the relations it records by kind (an
    :class:`~daamkit.relation.ImageRelationMap` under ``"image->image"``, a
    :class:`~daamkit.relation.TokenRelationMatrix` under ``"text->text"``, when ``trace_options`` has
    ``relations``).

    A video pipeline gives ``(frames, heat maps)`` per video, frames a uint8 (frames, H, W, 3) array;
    ``num_images_per_prompt`` is passed as its ``num_videos_per_prompt`` and ``num_frames`` as is (an
    image pipeline refuses ``num_frames``).
    """
    prompts = list(prompts)
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator)
    params = _call_parameters(pipe)
    video = "num_frames" in params
    if num_frames is not None:
        if not video:
            raise InputError(f"num_frames applies to video pipelines; {type(pipe).__name__} makes images")
        kwargs["num_frames"] = num_frames
    if num_images_per_prompt is not None:
        if not video:
            kwargs["num_images_per_prompt"] = num_images_per_prompt
        elif "num_videos_per_prompt" in params:
            kwargs["num_videos_per_prompt"] = num_images_per_prompt
        elif num_images_per_prompt != 1:
            raise InputError(f"{type(pipe).__name__} makes one video per prompt, not {num_images_per_prompt}")
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    if negative_prompt is not None:
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        kwargs["negative_prompt"] = negs
    with trace(pipe, **(trace_options or {})) as tc:
        out = pipe(prompts, **kwargs)
        maps = [{**{name: tc.heat_maps(i, method=name) for name in tc.method_names},
                 **{kind: tc.relation(i, kind) for kind in tc.relation_names}} for i in range(tc.num_images)]
    if getattr(out, "frames", None) is not None:
        from daamkit.video import as_frames

        images: Any = [as_frames(v) for v in out.frames]
    else:
        images = out.images
    return list(zip(images, maps, strict=True))


def record_media(image: Any, heat_maps: GlobalHeatMap) -> dict[str, Any]:
    """``image=`` / ``frames=`` for a :class:`RunRecord` from what :func:`traced_generation` gave."""
    return {"image": None, "frames": image} if heat_maps.is_video else {"image": image, "frames": None}


def generate(pipe: Any, prompts: str | Sequence[str], options: GenerateOptions | None = None,
             model: str | None = None) -> list[RunRecord]:
    """Generate ``prompts`` with ``pipe`` inside a trace; one :class:`RunRecord` per image.

    One generator seeded with ``options.seed`` serves the whole call.
    """
    return [rec for rec, _ in generate_with_methods(pipe, prompts, options, model)]


def generate_with_methods(pipe: Any, prompts: str | Sequence[str], options: GenerateOptions | None = None,
                          model: str | None = None) -> list[tuple[RunRecord, dict[str, Any]]]:
    """:func:`generate`, each record with the maps of the other methods traced (``"ovam"`` for
    ``options.open_vocabulary``), by method name, and the relations of ``options.relations`` by kind
    (``"image->image"``, ``"text->text"``: :func:`split_relations` tells them apart)."""
    opts = options or GenerateOptions()
    prompt_list = check_prompts(prompts)
    opts.check()
    pipe.set_progress_bar_config(disable=not opts.progress)
    trace_options = dict(opts.trace)
    if opts.open_vocabulary:
        trace_options["open_vocabulary"] = list(opts.open_vocabulary)
    if opts.relations:
        trace_options["relations"] = list(opts.relations)
        trace_options["query"] = opts.relation_query()
    pairs = traced_generation_maps(
        pipe, prompt_list, generator=make_generators(pipe, [opts.seed])[0], steps=opts.steps,
        guidance_scale=opts.guidance_scale, height=opts.height or None, width=opts.width or None,
        negative_prompt=opts.negative_prompt or None, num_images_per_prompt=opts.num_images_per_prompt,
        trace_options=trace_options, num_frames=opts.num_frames,
    )
    settings = opts.settings() | {"model": model, "pipeline": type(pipe).__name__}
    if pairs and pairs[0][1]["daam"].is_video and opts.fps is None:
        from daamkit.video import default_fps

        settings["fps"] = default_fps(type(pipe).__name__)
    records = []
    for i, (image, by_method) in enumerate(pairs):
        hm = by_method["daam"]
        prompt = prompt_list[i // opts.num_images_per_prompt]
        records.append((
            RunRecord(
                prompt=prompt,
                **record_media(image, hm),
                heat_maps=hm,
                seed=opts.seed,
                settings=settings,
                negative_prompt=opts.negative_prompt,
                meta={"image_index": i},
            ),
            {name: m for name, m in by_method.items() if name != "daam"},
        ))
    return records


def split_relations(others: Mapping[str, Any]) -> tuple[dict[str, GlobalHeatMap], dict[str, Any]]:
    """(other methods' maps, relations) of what :func:`generate_with_methods` gives beside a record."""
    from daamkit.relation import RELATIONS

    return ({k: v for k, v in others.items() if k not in RELATIONS},
            {k: v for k, v in others.items() if k in RELATIONS})


def expected_image_size(pipe: Any, options: GenerateOptions) -> tuple[int, int] | None:
    """(H, W) pixels of what ``pipe`` will generate with ``options``, where it can be told before the call:
    ``options.height``/``width``, else the pipeline's default size (its UNet's sample size, or its
    ``default_sample_size``, times the VAE factor); None when unknown."""
    if options.height and options.width:
        return options.height, options.width
    factor = getattr(pipe, "vae_scale_factor", None)
    unet = getattr(pipe, "unet", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None) if unet is not None else None
    if sample is None:
        sample = getattr(pipe, "default_sample_size", None)
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        sample = tuple(sample)
    elif isinstance(sample, int):
        sample = (sample, sample)
    else:
        return None
    if not isinstance(factor, int) or factor < 1:
        return None
    h, w = sample[0] * factor, sample[1] * factor
    return options.height or h, options.width or w


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """``prompts`` as a list, or :class:`InputError` if there is none or one is blank."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or any(not str(p).strip() for p in prompt_list):
        raise InputError("the prompt is empty: give the text to generate from")
    return prompt_list


def check_against_pipeline(pipe: Any, options: GenerateOptions, prompts: str | Sequence[str] = (),
                           words: Sequence[str] | None = None) -> None:
    """Raise :class:`InputError` for what this pipeline decides, before any generation is spent:
    ``options.trace`` selecting no layer, factor, head or step of it, ``words`` missing from a prompt,
    video options (``num_frames``, ``fps``) for an image pipeline, a relation its family lacks, or a
    relation query outside the image it will make.
    """
    from daamkit.aggregate import AggregationConfig
    from daamkit.capture import detect_capture

    if not is_video_pipeline(pipe):
        for name, flag in (("num_frames", "--num-frames"), ("fps", "--fps")):
            if getattr(options, name) is not None:
                raise InputError(f"{flag} applies to video pipelines; {type(pipe).__name__} makes images")
    capture = detect_capture(pipe)
    if options.open_vocabulary:
        from daamkit.capture import UnsupportedPipelineError
        from daamkit.methods import OvamMethod

        if capture.family not in (OvamMethod.families or ()):
            raise UnsupportedPipelineError(f"{OvamMethod.requirement}; this pipeline is a {capture.family} model")
    query = options.relation_query()
    if options.relations:
        from daamkit.methods.relations import RELATION_METHODS

        if is_video_pipeline(pipe):
            raise InputError(f"relations are recorded for images; {type(pipe).__name__} makes videos")
        for kind in options.relations:
            method = RELATION_METHODS[kind]
            if capture.family not in (method.families or ()):
                raise InputError(f"{type(pipe).__name__} has no {kind} relation: {method.requirement}; this "
                                 f"pipeline is a {capture.family} model")
        size = expected_image_size(pipe, options)
        if query is not None and size is not None:
            query.check(size)  # else the trace checks it once the call has its size
    trace_opts = {k: v for k, v in options.trace.items() if k in AggregationConfig.__dataclass_fields__}
    config = AggregationConfig.reference(**trace_opts) if trace_opts.get("mode") == "reference" else \
        AggregationConfig(**trace_opts)
    factors = capture.layer_factors() if hasattr(capture, "layer_factors") else None
    # multistep schedulers (Heun, DPM2) call the denoiser `order` times per step
    calls = options.steps * int(getattr(getattr(pipe, "scheduler", None), "order", 1) or 1)
    config.check_selection(capture.layers, num_steps=calls, factors=factors)
    tokenizer = getattr(pipe, "tokenizer", None)
    if words and tokenizer is not None:
        from daamkit.tokens import align

        for prompt in ([prompts] if isinstance(prompts, str) else prompts):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True).input_ids
            alignment = align(tokenizer, ids, prompt)
            for w in words:
                alignment.find(w)  # raises WordNotFoundError naming the prompt's words


def slug(text: str, fallback: str = "word") -> str:
    """A file-name part for ``text``: lower case, runs of anything but a-z and 0-9 as one ``_``, at most
    40 characters; ``fallback`` when nothing is left (the caller names what the text labels)."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:40] or fallback


def write_outputs(record: RunRecord, out_dir: str | Path, words: Sequence[str] | None = None,
                  threshold: float = DEFAULT_THRESHOLD,
                  methods: Mapping[str, GlobalHeatMap] | None = None,
                  relations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the image, each word's heat map, overlay and mask (the normalised map ``>= threshold``), a
    grid PNG and the record into ``out_dir``; the paths and each mask's area fraction are returned.
    A video's record gets :func:`write_video_outputs` instead.

    methods: other methods' maps of the same image (``{"ovam": ...}``): every word of each is written
    the same way into ``out_dir/<method>/``, with its own grid and record (without the image).
    relations: the image's relations by kind (``{"image->image": ImageRelationMap, ...}``), written by
    :func:`write_relations` into ``out_dir/relations/``.
    """
    from daamkit.metrics import check_threshold

    try:
        threshold = check_threshold(threshold)
    except ValueError as e:
        raise InputError(str(e)) from None
    out = Path(out_dir)
    if record.heat_maps.is_video:
        return write_video_outputs(record, out, words=words)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"threshold": threshold}
    if record.image is not None:
        record.image.save(out / "image.png")
        paths["image"] = str(out / "image.png")
    paths.update(_write_maps(record.heat_maps, record.image, out, words, threshold))
    st, js = record.save(out / "record")
    paths["record"] = [str(st), str(js)]
    for name, hm in (methods or {}).items():
        sub = out / slug(name, "method")
        part = _write_maps(hm, record.image, sub, None, threshold)
        st, js = RunRecord(prompt=record.prompt, image=None, heat_maps=hm, seed=record.seed, settings=record.settings,
                           negative_prompt=record.negative_prompt, meta={**record.meta, "method": name}).save(sub / "record")
        paths.setdefault("methods", {})[name] = {**part, "record": [str(st), str(js)]}
    if relations:
        paths["relations"] = write_relations(relations, out / "relations", record.image)
    return paths


def write_relations(relations: Mapping[str, Any], out_dir: str | Path, image: Any = None) -> dict[str, Any]:
    """Each relation's plot and arrays in ``out_dir``, named by its kind (``image_image``, ``text_text``):
    ``<name>.png`` (image->image: each query's map over ``image`` with the query marked, ``_<k>`` per
    query after the first; text->text: the word x word matrix) and ``<name>.safetensors`` + ``.json``
    (:func:`daamkit.io.relations.save_relation`). Returns the paths."""
    from daamkit import plot
    from daamkit.io.relations import save_relation
    from daamkit.relation import ImageRelationMap

    out = Path(out_dir)
    paths: dict[str, Any] = {}
    for kind, rel in relations.items():
        name = slug(kind, "relation")
        entry: dict[str, Any] = {}
        if isinstance(rel, ImageRelationMap):
            entry["plots"] = [
                str(plot.save_figure(rel.plot(image, k=k).figure, out / f"{name}{'' if k == 0 else f'_{k}'}.png"))
                for k in range(rel.maps.shape[0])
            ]
        else:
            entry["plots"] = [str(plot.save_figure(rel.plot().figure, out / f"{name}.png"))]
        st, js = save_relation(rel, out / name)
        entry["arrays"] = [str(st), str(js)]
        paths[kind] = entry
    return paths


def _write_maps(hm: GlobalHeatMap, image: Any, out: Path, words: Sequence[str] | None,
                threshold: float) -> dict[str, Any]:
    """Each word's map, overlay (if there is an image) and mask, and the grid, under ``out``."""
    from PIL import Image

    from daamkit import plot

    for sub in ("maps", "overlays", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"words": {}}
    chosen = list(words) if words else hm.words
    word_maps = [(w, hm.word(w)) for w in chosen]  # raises with the prompt's words if one is unknown
    used: set[str] = set()
    for w, wm in word_maps:
        name = slug(w)
        while name in used:
            name += "_"
        used.add(name)
        entry = {"map": str(plot.save_heat_image(wm, out / "maps" / f"{name}.png"))}
        if image is not None:
            entry["overlay"] = str(plot.save_overlay(wm, image, out / "overlays" / f"{name}.png"))
        mask = threshold_mask(wm.normalized(), threshold)
        Image.fromarray(mask.astype("uint8") * 255).save(out / "masks" / f"{name}.png")
        entry["mask"] = str(out / "masks" / f"{name}.png")
        entry["mask_area"] = float(mask.mean())
        paths["words"][w] = entry
    fig = plot.plot_grid(hm, image=image, words=[w for w, _ in word_maps])
    paths["grid"] = str(plot.save_figure(fig, out / "grid.png"))
    return paths


def _word_names(words: Sequence[str]) -> list[str]:
    """File names for ``words``: :func:`slug`, made distinct."""
    used: set[str] = set()
    names = []
    for w in words:
        name = slug(w)
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    return names


def write_video_outputs(record: RunRecord, out_dir: str | Path, words: Sequence[str] | None = None,
                        fps: float | None = None) -> dict[str, Any]:
    """A video's outputs in ``out_dir``: ``video.mp4``, per word ``overlays/<word>.mp4`` (the map over
    each frame, normalised over the whole video) and ``overlays/<word>_frames.png`` (8 frames and their
    overlays), ``frame_scores.png`` (each word's score per frame) and the record. Returns the paths and
    each word's frame scores. Without ffmpeg the videos are GIFs (see :func:`daamkit.video.write_video`).
    ``fps`` defaults to the record's ``settings["fps"]``, else the pipeline's usual rate.
    """
    from daamkit import plot, video

    hm = record.heat_maps
    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if fps is None:
        fps = record.settings.get("fps") or video.default_fps(str(record.settings.get("pipeline") or ""))
    chosen = list(words) if words else hm.words
    word_maps = [(w, hm.word(w)) for w in chosen]  # raises with the prompt's words if one is unknown
    paths: dict[str, Any] = {"fps": fps, "num_frames": hm.num_frames, "words": {}}
    if record.frames is not None:
        paths["video"] = str(video.write_video(record.frames, out / "video.mp4", fps))
    for (w, wm), name in zip(word_maps, _word_names(chosen), strict=True):
        entry: dict[str, Any] = {"frame_scores": [float(v) for v in wm.frame_scores()]}
        if record.frames is not None:
            over = video.overlay_frames(wm, record.frames)
            entry["overlay_video"] = str(video.write_video(over, out / "overlays" / f"{name}.mp4", fps))
            grid = out / "overlays" / f"{name}_frames.png"
            video.frame_grid(wm, record.frames).save(grid)
            entry["frames"] = str(grid)
        paths["words"][w] = entry
    ax = plot.plot_frame_scores(hm, words=[w for w, _ in word_maps], fps=fps)
    paths["frame_scores"] = str(plot.save_figure(ax.figure, out / "frame_scores.png"))
    st, js = record.save(out / "record")
    paths["record"] = [str(st), str(js)]
    return paths
