"""Phase ``data``: the training scenes rendered once (in ``data_workers`` processes), their token
ids, and the grounding targets the UNet phase reads; and how the UNet phase draws scenes from them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .common import mark, tokenizer
from .recipe import Recipe, object_count_weights

GROUNDED_ROLES = ("noun", "color", "size")
MAX_OBJECTS = 3


def data_workers(r: Recipe) -> int:
    """Processes that render the training scenes (phase ``data`` and the grounding targets):
    ``data_workers``, or by default one per thread."""
    return max(1, r.data_workers if r.data_workers is not None else r.threads)


def chunks(n: int, workers: int) -> list[tuple[int, int]]:
    size = max(1, min(2000, -(-n // workers)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def map_chunks(func, jobs: list, workers: int, desc: str) -> list:
    """``func`` over ``jobs`` in order, in ``workers`` spawned processes (spawn, not fork: this process
    may already hold torch's thread pools). Each scene comes from its own seed, so the result does not
    depend on the worker count."""
    from tqdm import tqdm

    def bar(it):
        return tqdm(it, total=len(jobs), desc=desc, unit="chunk", mininterval=5, file=sys.stderr)

    if workers <= 1 or len(jobs) <= 1:
        return [func(j) for j in bar(jobs)]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return list(bar(pool.imap(func, jobs)))


def cell_coverage(mask: np.ndarray) -> np.ndarray:
    """A 64 x 64 boolean mask as the share of each 4 x 4 latent cell it covers, in 0..255."""
    return (mask.reshape(16, 4, 16, 4).mean((1, 3)) * 255).astype(np.uint8)


def token_ids(tok, captions: list[str]) -> np.ndarray:
    return tok(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids.astype(np.int32)


def render_chunk(job: tuple[int, int, int, str]):
    """Render scenes ``a..b`` once for everything the training reads from them: the images, their
    object coverage, the token ids, and the grounding targets (each object's mask and, per token,
    which objects its word names)."""
    from daamkit.world.scenes import make_scene

    a, b, data_seed, out = job
    tok = tokenizer(Path(out))
    imgs = np.empty((b - a, 64, 64, 3), np.uint8)
    objmask = np.empty((b - a, 16, 16), np.uint8)
    caps, scenes = [], []
    for k, i in enumerate(range(a, b)):
        s = make_scene(data_seed + i, "train")
        imgs[k] = np.asarray(s.image)
        m = s.masks.any(0) if len(s.masks) else np.zeros((64, 64), bool)
        objmask[k] = cell_coverage(m)
        caps.append(s.caption)
        scenes.append(s)
    ids = token_ids(tok, caps)
    return imgs, objmask, caps, ids, object_targets(scenes, tok, ids)


def phase_data(r: Recipe, out: Path, log) -> None:
    tok = tokenizer(out)  # written once, before the workers read it
    n = r.dataset_size
    workers = data_workers(r)
    jobs = [(a, b, r.data_seed, str(out)) for a, b in chunks(n, workers)]
    t0 = time.time()
    parts = map_chunks(render_chunk, jobs, workers, "render")
    imgs = np.concatenate([q[0] for q in parts])
    objmask = np.concatenate([q[1] for q in parts])
    caps = [c for q in parts for c in q[2]]
    ids = np.concatenate([q[3] for q in parts])
    print(f"data: {n} scenes rendered in {time.time() - t0:.0f} s", file=sys.stderr)
    np.savez(out / "data.npz", images=imgs, objmask=objmask, input_ids=ids)
    (out / "captions.txt").write_text("\n".join(caps) + "\n")
    np.save(out / "empty_ids.npy", token_ids(tok, [""])[0])
    # the grounding targets come from the very scenes just rendered, so they are written here rather
    # than by rendering all of them a second time when the UNet phase first needs them
    save_ground_targets(out, [q[4] for q in parts], time.time() - t0)
    log(phase="data", n=n)
    mark(out, "data", {"n": n})


# ------------------------------------------------------------------------------ grounding targets


def token_object_bits(scene, tok, ids: np.ndarray) -> np.ndarray | None:
    """(77,) uint8: bit o set where the token belongs to a noun, colour or size word of object o.
    Words come from :func:`daamkit.tokens.align`, the alignment DAAM itself reads maps through; None
    if its words do not match the scene's caption words (then the sample is not grounded)."""
    from daamkit.tokens import align

    try:
        al = align(tok, ids.tolist(), prompt=scene.caption)
    except ValueError:
        return None
    seen = [w for w in al.words if not w.is_punctuation]
    if [w.text for w in seen] != [w.text for w in scene.words]:
        return None
    bits = np.zeros(len(ids), np.uint8)
    for w, cw in zip(seen, scene.words, strict=True):
        if cw.role in GROUNDED_ROLES and cw.objects:
            bits[list(w.positions)] = sum(1 << o for o in cw.objects)
    return bits


def object_targets(scenes: list, tok, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The grounding targets of ``scenes`` (token ids ``ids``): each object's mask at the latent grid
    (coverage in 0..255), per token the bits of the objects its word names, and how many captions
    could not be aligned (their bits stay 0: not grounded)."""
    masks = np.zeros((len(scenes), MAX_OBJECTS, 16, 16), np.uint8)
    bits = np.zeros((len(scenes), ids.shape[1]), np.uint8)
    skipped = 0
    for k, s in enumerate(scenes):
        for o, m in enumerate(s.masks[:MAX_OBJECTS]):
            masks[k, o] = cell_coverage(m)
        bb = token_object_bits(s, tok, ids[k])
        if bb is None:
            skipped += 1
        else:
            bits[k] = bb
    return masks, bits, skipped


def ground_chunk(job: tuple[int, int, int, np.ndarray, str]):
    from daamkit.world.scenes import make_scene

    a, b, data_seed, ids, out = job
    scenes = [make_scene(data_seed + i, "train") for i in range(a, b)]
    return object_targets(scenes, tokenizer(Path(out)), ids)


def save_ground_targets(out: Path, parts: list, seconds: float) -> Path:
    path = out / "ground.npz"
    masks = np.concatenate([q[0] for q in parts])
    bits = np.concatenate([q[1] for q in parts])
    skipped = sum(q[2] for q in parts)
    # written whole, then renamed: a reader never sees a half-written file
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, masks=masks, bits=bits)
    os.replace(tmp, path)
    print(f"grounding targets: {len(bits) - skipped} of {len(bits)} captions aligned ({seconds:.0f} s)", file=sys.stderr)
    return path


def ground_targets(r: Recipe, out: Path) -> Path:
    """``ground.npz``, what the grounding loss needs. The data phase writes it; this renders the
    scenes again only for a data folder made before it did (or with the file removed)."""
    path = out / "ground.npz"
    if path.exists():
        return path
    ids = np.load(out / "data.npz")["input_ids"]
    tokenizer(out)  # written once, before the workers read it
    workers = data_workers(r)
    jobs = [(a, b, r.data_seed, ids[a:b], str(out)) for a, b in chunks(len(ids), workers)]
    t0 = time.time()
    parts = map_chunks(ground_chunk, jobs, workers, "grounding targets")
    return save_ground_targets(out, parts, time.time() - t0)


# ------------------------------------------------------------------------------ drawing the scenes


def needs_ground_targets(r: Recipe) -> bool:
    """Whether the UNet phase reads ``ground.npz``: the grounding loss and the object-count sampler
    take their object masks from it. One rule, so that the data-parallel launcher builds the file
    before its workers need it."""
    return r.ground_weight > 0 or object_count_weights(r.object_count_weights) is not None


def scene_sampler(r: Recipe, out: Path, n: int):
    """Draws the training scenes of a batch: uniformly, or weighted by how many objects each scene
    has (the multi-object scenes are where shapes go wrong). Uniform weights draw from the same random
    stream as an unweighted sampler would."""
    w = object_count_weights(r.object_count_weights)
    if w is None:
        return lambda gen, k: gen.integers(0, n, k)
    masks = np.load(ground_targets(r, out))["masks"]  # (n, 3, 16, 16): one slot per object
    count = (masks.reshape(len(masks), masks.shape[1], -1).max(axis=2) > 0).sum(axis=1).clip(1, 3)
    p = np.asarray(w)[count - 1]
    p = p / p.sum()
    return lambda gen, k: gen.choice(n, size=k, p=p)
