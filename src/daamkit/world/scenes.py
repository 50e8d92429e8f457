"""Procedural scenes of the shapes world: flat coloured shapes with exact masks and varied captions.

Everything is deterministic given a seed: ``make_scene(seed, split)`` always returns the same image,
caption and masks. Images are drawn at ``SUPERSAMPLE`` x the output size and box-downsampled for
antialiasing. An object's (visible) mask at output size is the set of pixels where the object's visible
part (after occlusion by objects drawn later) covers more of the pixel's area than the background or
any other object (ties go to the topmost); visible masks are therefore disjoint and match the pixels.
``full_masks`` are the amodal silhouettes (pixels at least half covered, ignoring occlusion, plus the
visible mask).

Per-word masks (``Scene.word_masks``):

* shape noun (``circle``/``circles``) -> the visible pixels of the object(s) it names;
* colour adjective, size adjective -> the object they modify;
* count word (``two``/``three``) -> the union of the counted objects;
* relation words (``above``, ``below``, ``left``, ``right``, ``next``, ``to``, ``of``, ``the``
  inside a relation phrase, and ``and``/``with`` joining two objects) -> the union of the two
  related objects (a documented choice: a relation is about both of its arguments);
* background words (``grey``, ``striped``, ``background``, ...) -> the background (no object);
* articles and filler words (``a``, ``an``, ``there``, ``is``, ``picture``, ``on``) -> no mask (``None``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS: dict[str, str] = {s: s + "s" if s != "cross" else "crosses" for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 10),
}
# Backgrounds are achromatic, so every object colour is far from every background colour.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "white": ((255, 255, 255),),
    "grey": ((128, 128, 128),),
    "black": ((20, 20, 20),),
    "striped": ((235, 235, 235), (175, 175, 175)),
}
BACKGROUND_WORDS: dict[str, str] = {"white": "white", "grey": "grey", "black": "black", "striped": "striped"}
# radius (half extent) in output pixels for each size class
SIZES: dict[str, tuple[float, float]] = {"small": (6.0, 8.5), "medium": (10.0, 13.0), "large": (15.0, 19.0)}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny"), "large": ("large", "big")}

# Held out of the training split: these colour-shape pairs never appear (in images or captions),
# one per colour and one per shape.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "heart"),
        ("green", "star"),
        ("blue", "triangle"),
        ("yellow", "cross"),
        ("purple", "circle"),
        ("orange", "square"),
    }
)

RELATIONS: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below",),
    "left": ("to", "the", "left", "of"),
    "right": ("to", "the", "right", "of"),
    "next": ("next", "to"),
}

# Caption templates. The ids of HELDOUT_TEMPLATES never occur in the training split; they combine
# phrases that training does see (so every word is known) in sentence forms it does not.
TEMPLATES: tuple[str, ...] = (
    "single",  # a red circle
    "single_bg",  # a red circle on a grey background
    "single_there",  # there is a red circle
    "single_picture",  # a picture of a red circle
    "pair_and",  # a red circle and a blue star
    "pair_with",  # a red circle with a blue star
    "pair_rel",  # a red circle above a blue star
    "count",  # two green squares
    "count_bg",  # two green squares on a white background
    "triple",  # a red circle, a blue star and a green heart
    # held out:
    "pair_and_bg",  # a red circle and a blue star on a grey background
    "there_pair_rel",  # there is a red circle above a blue star
    "picture_count",  # a picture of two green squares
)
HELDOUT_TEMPLATES: frozenset[str] = frozenset({"pair_and_bg", "there_pair_rel", "picture_count"})
TRAIN_TEMPLATES: tuple[str, ...] = tuple(t for t in TEMPLATES if t not in HELDOUT_TEMPLATES)
_TEMPLATE_WEIGHTS = {
    "single": 3,
    "single_bg": 2,
    "single_there": 1,
    "single_picture": 1,
    "pair_and": 3,
    "pair_with": 1,
    "pair_rel": 4,
    "count": 2,
    "count_bg": 1,
    "triple": 2,
    "pair_and_bg": 1,
    "there_pair_rel": 1,
    "picture_count": 1,
}
_N_OBJECTS = {
    "single": 1,
    "single_bg": 1,
    "single_there": 1,
    "single_picture": 1,
    "pair_and": 2,
    "pair_with": 2,
    "pair_rel": 2,
    "count": 0,  # 2 or 3
    "count_bg": 0,
    "triple": 3,
    "pair_and_bg": 2,
    "there_pair_rel": 2,
    "picture_count": 0,
}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "medium" | "large"
    cx: float  # centre, output pixels
    cy: float
    radius: float  # half extent, output pixels
    angle: float = 0.0  # rotation in degrees (small jitter)


@dataclass
class CaptionWord:
    text: str  # the word as written (lower case, no punctuation)
    role: str  # "noun" | "color" | "size" | "count" | "relation" | "background" | "other"
    objects: tuple[int, ...] | None  # indices into Scene.objects; () = background; None = no mask


@dataclass
class Scene:
    seed: int
    split: str
    template: str
    background: str
    objects: list[SceneObject]
    caption: str
    words: list[CaptionWord]
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    masks: np.ndarray  # (n_objects, H, W) bool, visible pixels of each object (disjoint)
    full_masks: np.ndarray  # (n_objects, H, W) bool, each object's whole silhouette (amodal)
    relation: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def background_mask(self) -> np.ndarray:
        return ~self.masks.any(0) if len(self.masks) else np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)

    def object_mask(self, objects: tuple[int, ...] | None) -> np.ndarray | None:
        if objects is None:
            return None
        if len(objects) == 0:
            return self.background_mask
        return self.masks[list(objects)].any(0)

    def word_masks(self) -> list[tuple[str, str, np.ndarray | None]]:
        """``[(word, role, mask or None), ...]`` in caption order (repeated words appear repeatedly)."""
        return [(w.text, w.role, self.object_mask(w.objects)) for w in self.words]

    def word_mask(self, word: str, occurrence: int = 0) -> np.ndarray | None:
        hits = [w for w in self.words if w.text == word]
        if occurrence >= len(hits):
            raise KeyError(f"{word!r} (occurrence {occurrence}) not in caption {self.caption!r}")
        return self.object_mask(hits[occurrence].objects)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "split": self.split,
            "template": self.template,
            "background": self.background,
            "caption": self.caption,
            "relation": self.relation,
            "objects": [vars(o).copy() for o in self.objects],
            "words": [{"text": w.text, "role": w.role, "objects": w.objects} for w in self.words],
        }


# ----------------------------------------------------------------------------------------- geometry


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float = 0.0, n: int = 96) -> list:
    """Vertices (x, y) of a shape of half extent ``r`` centred on (cx, cy); circle -> many-gon."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    elif shape == "square":
        s = 0.86
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":  # pointing up, centroid-ish centred
        pts = [(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]
    elif shape == "star":  # five points
        pts = []
        for i in range(10):
            rr = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a) + 0.08))
    elif shape == "heart":
        pts = []
        for i in range(n):
            t = 2 * math.pi * i / n
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 15.5))
    elif shape == "cross":  # plus sign
        a, b = 0.95, 0.32
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _silhouette(obj: SceneObject, size: int, ss: int) -> np.ndarray:
    big = size * ss
    im = Image.new("L", (big, big), 0)
    poly = shape_polygon(obj.shape, obj.cx * ss, obj.cy * ss, obj.radius * ss, obj.angle)
    ImageDraw.Draw(im).polygon(poly, fill=255)
    return np.asarray(im) > 127


def _background(name: str, size: int, ss: int, rng: random.Random) -> tuple[np.ndarray, dict]:
    big = size * ss
    cols = BACKGROUNDS[name]
    arr = np.empty((big, big, 3), np.uint8)
    arr[:] = cols[0]
    meta: dict = {}
    if name == "striped":
        period = rng.choice([10, 12, 16]) * ss
        direction = rng.choice(["h", "v", "d"])
        yy, xx = np.mgrid[0:big, 0:big]
        coord = {"h": yy, "v": xx, "d": xx + yy}[direction]
        arr[(coord // (period // 2)) % 2 == 1] = cols[1]
        meta = {"stripe_period": period // ss, "stripe_direction": direction}
    return arr, meta


def render(
    objects: list[SceneObject],
    background: str,
    rng: random.Random | None = None,
    size: int = IMAGE_SIZE,
    ss: int = SUPERSAMPLE,
) -> tuple[Image.Image, np.ndarray, np.ndarray, dict]:
    """Draw objects in order (later ones on top). Returns (image, visible masks, full masks, meta)."""
    rng = rng or random.Random(0)
    arr, meta = _background(background, size, ss, rng)
    owner = np.full((size * ss, size * ss), -1, np.int16)
    full = []
    for i, obj in enumerate(objects):
        sil = _silhouette(obj, size, ss)
        arr[sil] = COLORS[obj.color]
        owner[sil] = i
        full.append(sil)
    img = Image.fromarray(arr).resize((size, size), Image.Resampling.BOX)

    def down(m: np.ndarray) -> np.ndarray:
        return m.reshape(size, ss, size, ss).mean((1, 3)) >= 0.5

    n = len(objects)
    # each output pixel goes to the label (background or object) covering most of its sub-pixels;
    # ties go to the object drawn last (on top)
    counts = np.stack([(owner == i).reshape(size, ss, size, ss).sum((1, 3)) for i in range(-1, n)])
    label = (len(counts) - 1 - np.argmax(counts[::-1], axis=0)) - 1
    vis = np.stack([label == i for i in range(n)]) if n else np.zeros((0, size, size), bool)
    fm = (
        np.stack([down(f) | v for f, v in zip(full, vis, strict=True)])
        if n
        else np.zeros((0, size, size), bool)
    )
    return img, vis, fm, meta


# ------------------------------------------------------------------------------------------ scenes


def _allowed(color: str, shape: str, split: str) -> bool:
    return split != "train" or (color, shape) not in HELDOUT_PAIRS


def _pick_pair(rng: random.Random, split: str, avoid: set | None = None) -> tuple[str, str]:
    while True:
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if _allowed(c, s, split) and (avoid is None or (c, s) not in avoid):
            return c, s


def _place(
    rng: random.Random, sizes: list[str], relation: str | None = None, size: int = IMAGE_SIZE
) -> list[tuple[float, float, float]] | None:
    """Centres and radii for objects of the given size classes, relation between objects 0 and 1."""
    for _ in range(200):
        out = []
        for s in sizes:
            lo, hi = SIZES[s]
            r = rng.uniform(lo, hi)
            m = r * 0.95 + 1
            out.append((rng.uniform(m, size - m), rng.uniform(m, size - m), r))
        ok = True
        for i in range(len(out)):
            for j in range(i):
                (x1, y1, r1), (x2, y2, r2) = out[i], out[j]
                d = math.hypot(x1 - x2, y1 - y2)
                # overlaps vary but each object keeps most of itself visible
                if d < 0.75 * (r1 + r2) or d < max(r1, r2) + 0.4 * min(r1, r2):
                    ok = False
        if ok and relation is not None and len(out) >= 2:
            (xa, ya, ra), (xb, yb, rb) = out[0], out[1]
            dx, dy = xa - xb, ya - yb
            if relation == "above":
                ok = -dy > 0.6 * (ra + rb) and abs(dx) < abs(dy) * 0.7
            elif relation == "below":
                ok = dy > 0.6 * (ra + rb) and abs(dx) < abs(dy) * 0.7
            elif relation == "left":
                ok = -dx > 0.6 * (ra + rb) and abs(dy) < abs(dx) * 0.7
            elif relation == "right":
                ok = dx > 0.6 * (ra + rb) and abs(dy) < abs(dx) * 0.7
            elif relation == "next":
                ok = abs(dx) > 0.6 * (ra + rb) and abs(dy) < abs(dx) * 0.5
        if ok:
            return out
    return None


def _np_words(rng: random.Random, obj: SceneObject, i: int, with_size: bool) -> list[CaptionWord]:
    ws = []
    if with_size and obj.size in SIZE_WORDS:
        ws.append(CaptionWord(rng.choice(SIZE_WORDS[obj.size]), "size", (i,)))
    ws.append(CaptionWord(obj.color, "color", (i,)))
    ws.append(CaptionWord(obj.shape, "noun", (i,)))
    article = "an" if ws[0].text[0] in "aeiou" else "a"
    return [CaptionWord(article, "other", None)] + ws


def _bg_words(bg: str, objs: tuple[int, ...]) -> list[CaptionWord]:
    return [
        CaptionWord("on", "other", None),
        CaptionWord("a", "other", None),
        CaptionWord(BACKGROUND_WORDS[bg], "background", ()),
        CaptionWord("background", "background", ()),
    ]


def _choose_template(rng: random.Random, split: str) -> str:
    names = TRAIN_TEMPLATES if split == "train" else TEMPLATES
    weights = [_TEMPLATE_WEIGHTS[t] for t in names]
    return rng.choices(names, weights=weights)[0]


def make_scene(seed: int, split: str = "train", template: str | None = None) -> Scene:
    """The scene for ``seed`` in ``split`` ("train" or "test"); deterministic.

    The train split never contains HELDOUT_PAIRS nor HELDOUT_TEMPLATES. The "test" split draws from
    every pair and template (use :func:`make_heldout_scene` for held-out-only scenes).
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"{split}:{seed}")
    tpl = template or _choose_template(rng, split)
    if split == "train" and tpl in HELDOUT_TEMPLATES:
        raise ValueError(f"template {tpl!r} is held out of the training split")
    for _attempt in range(100):
        scene = _try_scene(rng, seed, split, tpl)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place a scene for seed {seed}")  # pragma: no cover


def make_heldout_scene(seed: int) -> Scene:
    """A test scene that uses a held-out template or a held-out colour-shape pair (or both)."""
    k = 0
    while True:
        s = make_scene(seed * 1000 + k, "test")
        if is_heldout(s):
            s.seed = seed
            s.meta["source_seed"] = seed * 1000 + k
            return s
        k += 1


def is_heldout(scene: Scene) -> bool:
    return scene.template in HELDOUT_TEMPLATES or any(
        (o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects
    )


def _try_scene(rng: random.Random, seed: int, split: str, tpl: str) -> Scene | None:
    bg = rng.choices(list(BACKGROUNDS), weights=[3, 2, 1, 2])[0]
    relation = None
    with_size = rng.random() < 0.35
    words: list[CaptionWord] = []
    objs: list[SceneObject] = []

    def new_obj(c: str, s: str, size: str) -> SceneObject:
        return SceneObject(s, c, size, 0, 0, 0, rng.uniform(-12, 12) if s not in ("circle",) else 0.0)

    def size_class() -> str:
        return rng.choices(["small", "medium", "large"], weights=[1, 2, 1])[0]

    if tpl.startswith("single"):
        c, s = _pick_pair(rng, split)
        objs = [new_obj(c, s, size_class())]
    elif tpl in ("pair_and", "pair_with", "pair_rel", "pair_and_bg", "there_pair_rel"):
        c1, s1 = _pick_pair(rng, split)
        c2, s2 = _pick_pair(rng, split, avoid={(c1, s1)})
        objs = [new_obj(c1, s1, size_class()), new_obj(c2, s2, size_class())]
        if tpl in ("pair_rel", "there_pair_rel"):
            relation = rng.choice(list(RELATIONS))
        elif tpl == "pair_and":
            relation = None
    elif tpl in ("count", "count_bg", "picture_count"):
        n = rng.choice([2, 2, 3])
        c, s = _pick_pair(rng, split)
        sz = rng.choice(["small", "medium", "medium"])
        objs = [new_obj(c, s, sz) for _ in range(n)]
        with_size = False
    elif tpl == "triple":
        pairs: set = set()
        for _ in range(3):
            c, s = _pick_pair(rng, split, avoid=pairs)
            pairs.add((c, s))
            objs.append(new_obj(c, s, rng.choice(["small", "medium"])))
    else:
        raise ValueError(f"unknown template {tpl!r}")

    placed = _place(rng, [o.size for o in objs], relation)
    if placed is None:
        return None
    for o, (x, y, r) in zip(objs, placed, strict=True):
        o.cx, o.cy, o.radius = x, y, r

    n = len(objs)
    if tpl.startswith("single"):
        np0 = _np_words(rng, objs[0], 0, with_size)
        if tpl == "single":
            words = np0
        elif tpl == "single_bg":
            words = np0 + _bg_words(bg, (0,))
        elif tpl == "single_there":
            words = [CaptionWord("there", "other", None), CaptionWord("is", "other", None)] + np0
        elif tpl == "single_picture":
            words = [
                CaptionWord("a", "other", None),
                CaptionWord("picture", "other", None),
                CaptionWord("of", "other", None),
            ] + np0
    elif n == 2 and tpl.startswith(("pair", "there_pair")):
        both = (0, 1)
        np0 = _np_words(rng, objs[0], 0, with_size)
        np1 = _np_words(rng, objs[1], 1, with_size)
        if tpl in ("pair_and", "pair_and_bg"):
            mid = [CaptionWord("and", "relation", both)]
        elif tpl == "pair_with":
            mid = [CaptionWord("with", "relation", both)]
        else:
            mid = [CaptionWord(w, "relation", both) for w in RELATIONS[relation]]  # type: ignore[index]
        words = np0 + mid + np1
        if tpl == "pair_and_bg":
            words += _bg_words(bg, both)
        if tpl == "there_pair_rel":
            words = [CaptionWord("there", "other", None), CaptionWord("is", "other", None)] + words
    elif tpl in ("count", "count_bg", "picture_count"):
        allo = tuple(range(n))
        words = [
            CaptionWord({2: "two", 3: "three"}[n], "count", allo),
            CaptionWord(objs[0].color, "color", allo),
            CaptionWord(PLURALS[objs[0].shape], "noun", allo),
        ]
        if tpl == "count_bg":
            words += _bg_words(bg, allo)
        if tpl == "picture_count":
            words = [
                CaptionWord("a", "other", None),
                CaptionWord("picture", "other", None),
                CaptionWord("of", "other", None),
            ] + words
    elif tpl == "triple":
        words = _np_words(rng, objs[0], 0, False) + _np_words(rng, objs[1], 1, False)
        words += [CaptionWord("and", "relation", (1, 2))] + _np_words(rng, objs[2], 2, False)

    # caption text: a comma after the first object of a triple
    parts = [w.text for w in words]
    if tpl == "triple":
        first_noun = next(k for k, w in enumerate(words) if w.role == "noun")
        parts[first_noun] = parts[first_noun] + ","
    caption = " ".join(parts)

    # draw in random order (so overlap occlusion varies), but keep object indices = caption order
    order = list(range(n))
    rng.shuffle(order)
    img, vis, full, meta = render([objs[i] for i in order], bg, rng)
    inv = np.argsort(order)
    vis, full = vis[inv], full[inv]
    # every object must stay clearly visible
    if n and (vis.sum((1, 2)) < 0.45 * full.sum((1, 2))).any():
        return None
    meta["draw_order"] = order
    return Scene(seed, split, tpl, bg, objs, caption, words, img, vis, full, relation, meta)


def scene_stream(start: int, split: str = "train"):
    """Scenes for seeds start, start+1, ... (infinite generator)."""
    i = start
    while True:
        yield make_scene(i, split)
        i += 1


def render_batch(seeds, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """uint8 images (N, H, W, 3) and captions for the given seeds."""
    scenes = [make_scene(int(s), split) for s in seeds]
    return np.stack([np.asarray(s.image) for s in scenes]), [s.caption for s in scenes]
