"""The shapes-world training script end to end, on a toy budget: it must save a standard diffusers
folder that StableDiffusionPipeline loads offline and that generates an image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def world_train(argv: list[str]) -> int:
    """``daamkit world train ARGV``, through the CLI."""
    from daamkit.cli import main

    return main(["world", "train", *argv])


@pytest.mark.slow
def test_train_tiny_end_to_end(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    main = world_train
    out = tmp_path / "run"
    argv = [
        "--out",
        str(out),
        "--threads",
        "1",
        "--dataset-size",
        "24",
        "--latent-channels",
        "6",  # not the default 4: every phase must follow the option
        "--vae-channels",
        "8,8,8",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--unet-channels",
        "16,16,16",
        "--heads",
        "2",
        "--text-width",
        "16",
        "--unet-steps",
        "3",
        "--batch",
        "4",
        "--decoder-steps",
        "2",
        "--sample-steps",
        "0",
        # a layered text encoder end to end; the other tests train the default 0-layer one
        "--text-layers",
        "1",
    ]
    assert main(argv) == 0
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["text_layers"] == 1 and recorded["latent_channels"] == 6
    model = out / "model"
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / sub).exists()
    assert list(model.rglob("*.safetensors"))
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert json.loads((model / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "unet_done" for r in log)
    assert any(r["phase"] == "decoder_done" for r in log)
    done = [r for r in log if r["phase"] == "unet_done"][0]
    assert done["ground_avg"] is not None and 0 <= done["ground_avg"] <= 1  # the grounding loss ran
    assert (out / "ground.npz").exists()
    assert json.loads((out / "args.json").read_text())["bf16"] in (True, False)  # the default is resolved

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert (
        pipe.vae.config.latent_channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels == 6
    )
    tok = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # real CLIP ids
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert img.size == (64, 64)

    # a finished run refuses to start over without --resume, and --resume is a no-op once done
    assert main(argv) == 2
    assert main(argv + ["--resume"]) == 0

    # a later export needs no architecture flags: they come from the run's args.json ...
    before = (model / "unet" / "config.json").read_text()
    again = ["--out", str(out), "--resume", "--only", "export", "--threads", "1", "--sample-steps", "0"]
    assert main(again) == 0
    assert (model / "unet" / "config.json").read_text() == before
    # ... and a flag that contradicts them is refused before anything is written
    assert main(again + ["--unet-channels", "32,32,32"]) == 2
    assert (model / "unet" / "config.json").read_text() == before

    # a recipe option given again on --resume is kept in args.json with its history, and reaches the
    # export's record, while a hard link of the old args.json (runs share their files) stays as it was
    linked = tmp_path / "linked_args.json"
    linked.hardlink_to(out / "args.json")
    old_record = linked.read_text()
    assert main(again + ["--text-lr-mult", "2"]) == 0
    assert linked.read_text() == old_record
    record = json.loads((out / "args.json").read_text())
    assert record["text_lr_mult"] == 2.0
    assert record["changed_on_resume"][-1]["options"] == {"text_lr_mult": [1.0, 2.0]}
    info = json.loads((model / "daamkit_world.json").read_text())
    assert info["config"]["text_lr_mult"] == 2.0 and info["changed_on_resume"] == record["changed_on_resume"]


def test_token_object_bits_follow_the_caption_words():
    """Each token of a noun, colour or size word carries the bits of the objects that word names; other
    tokens, BOS, EOS and padding carry none. Words are rebuilt here from the ``</w>`` word ends of the
    tokens, independently of the alignment (``daamkit.tokens.align``) the training code uses."""
    import numpy as np
    from transformers import CLIPTokenizer

    from daamkit.world import default_model_path
    from daamkit.world.scenes import make_scene
    from daamkit.world.train.data import GROUNDED_ROLES, token_object_bits

    tok = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    multi = 0
    for seed in range(60):
        s = make_scene(seed, "train")
        ids = np.array(tok(s.caption, padding="max_length", max_length=77).input_ids)
        bits = token_object_bits(s, tok, ids)
        assert bits is not None, s.caption
        n = len(tok(s.caption).input_ids)
        assert bits[0] == 0 and not bits[n - 1 :].any()
        words, cur = [], []
        for pos, t in enumerate(tok.convert_ids_to_tokens(ids[1 : n - 1].tolist()), start=1):
            cur.append(pos)
            if t.endswith("</w>"):
                if t != ",</w>":
                    words.append(cur)
                cur = []
        assert len(words) == len(s.words), s.caption
        for w, positions in zip(s.words, words, strict=True):
            want = sum(1 << o for o in w.objects) if (w.role in GROUNDED_ROLES and w.objects) else 0
            assert [int(bits[p]) for p in positions] == [want] * len(positions), (s.caption, w.text)
            multi += len(positions) > 1 and want > 0
    assert multi > 0  # some grounded words span several tokens ("triangles")


def test_grounding_loss_is_low_on_the_mask_and_high_off_it():
    import torch

    from daamkit.world.train import grounding_loss

    res, heads, tokens = 16, 2, 77
    mask = torch.zeros(1, 3, res, res)
    mask[0, 0, 2:8, 3:9] = 1  # object 0
    mask[0, 1, 10:14, 9:15] = 1  # object 1
    bits = torch.zeros(1, tokens, dtype=torch.int64)
    bits[0, 2], bits[0, 5] = 1, 2  # token 2 names object 0, token 5 object 1
    keep = torch.ones(1, dtype=torch.bool)

    def loss_for(maps):  # maps: {token: (res, res) attention}
        probs = torch.full((heads, res * res, tokens), 1e-6)
        for t, m in maps.items():
            probs[:, :, t] = m.flatten()
        return grounding_loss([(heads, probs)], bits, mask, keep).item()

    right = loss_for({2: mask[0, 0], 5: mask[0, 1]})
    swapped = loss_for({2: mask[0, 1], 5: mask[0, 0]})
    peak = torch.zeros(res, res)
    peak[4, 5] = 1  # inside object 0 but covering one cell of it
    collapsed = loss_for({2: peak, 5: mask[0, 1]})
    assert right < 0.01
    assert swapped > 0.99
    assert right < collapsed < swapped  # the Dice term asks for coverage, not only containment
    # a dropped (unconditional) sample is not grounded
    assert grounding_loss([(heads, torch.rand(heads, res * res, tokens))], bits, mask, ~keep).item() == 0


def test_bf16_default_follows_native_support():
    """The default (--bf16 unset) autocasts only where bfloat16 is native: emulated bf16 on an older CPU
    is slower than float32, and the UNet phase is budgeted in minutes."""
    from daamkit.cli import build_parser
    from daamkit.world.train import Recipe, bf16_native

    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni") is True
    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 amx_tile amx_bf16") is True
    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 avx512f avx512_vnni") is False
    assert bf16_native(cpu_flags="flags\t: fpu avx512_bf16x") is False  # whole flags only
    assert bf16_native("meta", cpu_flags="flags\t: avx512_bf16") is False  # CPU flags say nothing of it
    assert Recipe().bf16 is None

    def parse(*argv):
        return build_parser().parse_args(["world", "train", *argv])

    assert parse().bf16 is None
    assert parse("--bf16").bf16 is True and parse("--no-bf16").bf16 is False


# one data process: the data phase's spawned workers have their own test
_TINY = (
    "--dataset-size 24 --vae-channels 8,8,8 --vae-steps 2 --vae-batch 4 --unet-channels 16,16,16 --heads 2 "
    "--text-width 16 --batch 4 --decoder-steps 3 --sample-steps 0 --data-workers 1"
).split()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [None, 1])
def test_decoder_runs_alongside_the_unet_in_a_second_process(tmp_path, workers):
    """With 2 threads a plain run fine-tunes the decoder in a second process while the UNet trains (that
    is how a complete run fits about 2 hours on 2 cores); the decoder's own output goes to decoder.log.
    When the decoder ends, the UNet takes its thread back: by default as a second data-parallel worker,
    with ``--unet-workers 1`` as a second thread of its one process."""
    from daamkit.cli import main

    out = tmp_path / "run"
    # through the CLI, whose parsed namespace also carries its dispatch function (not picklable);
    # enough UNet steps that the decoder process (a fresh interpreter) finishes while the UNet trains
    extra = [] if workers is None else ["--unet-workers", str(workers)]
    # (comfortably more single-thread steps than the decoder process needs on a 2-core CPU)
    steps = 120
    assert main(["world", "train", "--out", str(out), "--threads", "2", "--unet-steps", str(steps), *extra, *_TINY]) == 0
    assert json.loads((out / "decoder.done").read_text())["steps"] == 3
    assert "decoder: 3 steps" in (out / "decoder.log").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in log]
    assert "decoder_done" in phases and "unet_done" in phases
    # the decoder finished first and the UNet took its thread back
    assert phases.index("decoder_done") < phases.index("unet_done")
    if workers == 1:
        assert any(r["phase"] == "unet_threads" and r["threads"] == 2 for r in log)
        assert json.loads((out / "unet.done").read_text())["workers"] == 1
    else:
        handover = [r for r in log if r["phase"] == "unet_handover"]
        assert len(handover) == 1 and handover[0]["workers"] == 2 and 0 < handover[0]["step"] < steps
        done = json.loads((out / "unet.done").read_text())
        assert done["steps"] == steps and done["workers"] == 2
        assert not list(out.glob(".unet_workers_*"))  # the rendezvous file is gone
    assert (out / "model" / "vae" / "config.json").exists()
    # what the run records is this script's options, not the CLI's dispatch function
    recorded = json.loads((out / "args.json").read_text())
    assert "func" not in recorded and recorded["threads"] == 2
    card = json.loads((out / "model" / "daamkit_world.json").read_text())
    assert card["config"] == recorded


@pytest.mark.slow
def test_a_failed_unet_phase_stops_the_decoder_process(tmp_path, monkeypatch):
    """An exception in the UNet phase must not leave the decoder process running."""
    from daamkit.world.train import driver

    seen = {}

    def failing_unet(args, out, log, alongside=None):
        seen["alongside"] = alongside
        assert alongside is not None and alongside.running()
        raise RuntimeError("boom")

    monkeypatch.setattr(driver, "phase_unet", failing_unet)
    # the CLI reports a bug as one line, status 1, with the traceback in a log file
    assert world_train(["--out", str(tmp_path / "run"), "--threads", "2", "--unet-steps", "3", *_TINY]) == 1
    assert not seen["alongside"].running()
    assert not (tmp_path / "run" / "decoder.done").exists()


def test_decoder_alongside_default():
    """On by default with a spare core (or a UNet on another device), off with one thread, never when
    the decoder phase is skipped or already done."""
    from daamkit.world.train import Recipe, decoder_runs_alongside

    nowhere = Path("/nonexistent")
    assert Recipe().decoder_alongside is None
    assert decoder_runs_alongside(Recipe(threads=2), nowhere)
    assert not decoder_runs_alongside(Recipe(threads=1), nowhere)
    assert decoder_runs_alongside(Recipe(threads=1, device="cuda"), nowhere)
    assert decoder_runs_alongside(Recipe(threads=1, decoder_alongside=True), nowhere)
    assert not decoder_runs_alongside(Recipe(decoder_alongside=False), nowhere)
    assert not decoder_runs_alongside(Recipe(threads=2, decoder_minutes=0), nowhere)


def test_object_count_weights_sample_scenes_by_their_number_of_objects(tmp_path):
    """``--object-count-weights`` draws scenes of 1, 2 and 3 objects in proportion to their weights
    (object counts are read from the grounding targets' per-object masks); the default is 1,2,3;
    1,1,1 draws uniformly from the same random stream as before the option existed; bad weights are
    refused up front."""
    import numpy as np

    from daamkit.world.train import Recipe
    from daamkit.world.train.data import scene_sampler

    n = 300
    masks = np.zeros((n, 3, 16, 16), np.uint8)
    count = np.repeat([1, 2, 3], n // 3)
    for i, c in enumerate(count):
        masks[i, :c, 4:8, 4:8] = 255
    np.savez(tmp_path / "ground.npz", masks=masks, bits=np.zeros((n, 77), np.uint8))

    pick = scene_sampler(Recipe(object_count_weights="1,2,3"), tmp_path, n)
    share = np.bincount(count[pick(np.random.default_rng(0), 60_000)], minlength=4)[1:] / 60_000
    assert np.allclose(share, [1 / 6, 2 / 6, 3 / 6], atol=0.01), share
    only_three = scene_sampler(Recipe(object_count_weights="0,0,1"), tmp_path, n)
    assert set(count[only_three(np.random.default_rng(1), 500)]) == {3}

    default = scene_sampler(Recipe(), tmp_path, n)
    assert (default(np.random.default_rng(3), 64) == pick(np.random.default_rng(3), 64)).all()

    uniform = scene_sampler(Recipe(object_count_weights="1,1,1"), tmp_path / "missing", n)
    assert (uniform(np.random.default_rng(7), 32) == np.random.default_rng(7).integers(0, n, 32)).all()

    out = tmp_path / "run"
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        assert world_train(["--out", str(out), "--object-count-weights", bad]) == 2
    assert not out.exists()


def test_ground_targets_are_needed_by_each_option_that_reads_them(tmp_path):
    """The grounding loss and the object-count sampler each read ``ground.npz``; the data-parallel launcher builds it before spawning its workers exactly when one
    of them is on, and a run with none of them trains without the file."""
    import numpy as np

    from daamkit.world.train import Recipe
    from daamkit.world.train.data import needs_ground_targets, scene_sampler

    none = Recipe(ground_weight=0, object_count_weights="1,1,1")
    assert not needs_ground_targets(none)
    assert needs_ground_targets(Recipe())  # the default recipe: grounding and 1,2,3 weights
    assert needs_ground_targets(Recipe(ground_weight=0.2, object_count_weights="1,1,1"))
    assert needs_ground_targets(Recipe(ground_weight=0, object_count_weights="1,2,3"))
    # without the file, the sampler of a run that does not need it still draws
    assert len(scene_sampler(none, tmp_path / "missing", 10)(np.random.default_rng(0), 4)) == 4


def test_timestep_focus_draws_its_share_from_its_range(tmp_path):
    """``--timestep-focus LO,HI,SHARE`` draws about SHARE of the timesteps from [LO, HI) on top of the
    uniform draw over [0, 1000); given empty, the draw is the plain uniform one, from the same random
    stream as before the option existed; bad specs are refused before anything is written."""
    import torch

    from daamkit.world.train import Recipe
    from daamkit.world.train.unet import timestep_sampler

    t = timestep_sampler("100,450,0.5")(100_000)
    assert t.min() >= 0 and t.max() < 1000
    inside = ((t >= 100) & (t < 450)).float().mean().item()
    assert abs(inside - (0.5 + 0.5 * 0.35)) < 0.01, inside
    assert ((t >= 450) & (t < 1000)).float().mean().item() == pytest.approx(0.5 * 0.55, abs=0.01)

    assert Recipe().timestep_focus == "100,450,0.5"  # the shipped model's recipe
    torch.manual_seed(5)
    plain = timestep_sampler("")(64)
    torch.manual_seed(5)
    assert torch.equal(plain, torch.randint(0, 1000, (64,)))

    out = tmp_path / "run"
    for bad in ("100,450", "450,100,0.5", "0,1001,0.5", "100,450,1.5", "a,b,c"):
        assert world_train(["--out", str(out), "--timestep-focus", bad]) == 2
    assert not out.exists()






def test_grounding_loss_of_batch_parts_averages_to_the_whole_batch():
    """What each data-parallel worker computes: with ``norm`` = the whole batch's scored tokens over the
    number of workers, the mean of the parts' losses is the whole batch's loss (without it, a part with
    fewer scored tokens would weigh each of them more)."""
    import torch

    from daamkit.world.train import grounded_tokens, grounding_loss

    g = torch.Generator().manual_seed(0)
    b, pixels = 6, 64
    bits = torch.zeros(b, 77, dtype=torch.int64)
    bits[:, 1:4] = 1
    bits[:2, 5:9] = 2  # the first part has more scored tokens than the second
    keep = torch.tensor([True, True, False, True, True, True])
    masks = (torch.rand(b, 3, 8, 8, generator=g) > 0.5).float()
    store = [(2, torch.rand(b * 2, pixels, 77, generator=g).softmax(-1))]
    whole = grounding_loss(store, bits, masks, keep)
    parts = [slice(0, 3), slice(3, 6)]
    norm = grounded_tokens(bits, keep) / len(parts)

    def part(s, norm=None):  # the attention rows of a part's samples (all their heads)
        probs = store[0][1].reshape(b, 2, pixels, 77)[s].reshape(-1, pixels, 77)
        return grounding_loss([(2, probs)], bits[s], masks[s], keep[s], norm)

    split = [part(s, norm) for s in parts]
    torch.testing.assert_close(sum(split) / len(parts), whole)
    naive = [part(s) for s in parts]
    assert abs(float(sum(naive) / len(parts) - whole)) > 1e-5  # rounding is about 1e-7 here


def test_unet_workers_default_and_divide_the_batch():
    from daamkit.world.train import Recipe, unet_workers

    assert unet_workers(Recipe(threads=2)) == 2
    assert unet_workers(Recipe(threads=1)) == 1
    assert unet_workers(Recipe(threads=2, unet_workers=1)) == 1
    assert unet_workers(Recipe(threads=3)) == 2  # 3 does not divide the batch of 32
    assert unet_workers(Recipe(threads=4, unet_workers=8)) == 4  # not above --threads
    assert unet_workers(Recipe(threads=4, device="cuda")) == 1





@pytest.mark.slow
def test_data_workers_render_the_same_training_set(tmp_path):
    """Scenes rendered by two spawned processes are the ones one process renders, in seed order,
    for the data phase and for the grounding targets it writes with them; and the targets are those
    rendered again for a data folder that lacks them."""
    import shutil

    import numpy as np

    from daamkit.world.scenes import make_scene
    from daamkit.world.train import Recipe
    from daamkit.world.train.common import tokenizer
    from daamkit.world.train.data import chunks, ground_targets

    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        argv = ["--out", str(out), "--only", "data", "--threads", "1", "--dataset-size", "10"]
        assert world_train([*argv, "--data-workers", str(workers)]) == 0
        assert (out / "ground.npz").exists()  # written by the data phase itself
        outs[workers] = out
    again = tmp_path / "again"
    shutil.copytree(outs[1], again, ignore=shutil.ignore_patterns("ground.npz"))
    ground_targets(Recipe(data_workers=2), again)
    assert len(chunks(10, 2)) == 2  # so the second run really went through two processes
    for name, other in (("data.npz", outs[2]), ("ground.npz", outs[2]), ("ground.npz", again)):
        one, two = np.load(outs[1] / name), np.load(other / name)
        assert one.files == two.files
        for key in one.files:
            assert len(one[key]) == 10 and np.array_equal(one[key], two[key]), (name, other.name, key)
    captions = (outs[2] / "captions.txt").read_text().splitlines()
    assert captions == [make_scene(i, "train").caption for i in range(10)]
    ids = np.load(outs[2] / "data.npz")["input_ids"]
    tok = tokenizer(outs[2])
    assert np.array_equal(ids, tok(captions, padding="max_length", max_length=77, return_tensors="np").input_ids)
    assert np.load(outs[2] / "ground.npz")["bits"].any(axis=1).all()  # every caption's words grounded


def test_vae_from_takes_a_trained_autoencoder_whole(tmp_path, capsys):
    """`--vae-from shipped`: no VAE or decoder training; the latents are the shipped encoder's, at its
    scaling factor, and the exported pipeline carries the shipped autoencoder unchanged."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from daamkit.world import default_model_path
    from daamkit.world.train import Recipe, decoder_runs_alongside

    shipped = default_model_path() / "vae"
    out = tmp_path / "run"
    small_unet = ["--unet-channels", "16,16,16", "--heads", "2", "--text-width", "16", "--batch", "4"]
    argv = ["--out", str(out), "--threads", "1", "--dataset-size", "12", "--unet-steps", "1", *small_unet]
    assert world_train([*argv, "--sample-steps", "0", "--vae-from", "shipped"]) == 0

    ref = load_file(str(shipped / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    scale = json.loads((shipped / "config.json").read_text())["scaling_factor"]
    assert json.loads((out / "model" / "vae" / "config.json").read_text())["scaling_factor"] == scale
    assert json.loads((out / "latents.done").read_text())["scaling_factor"] == scale
    assert not (out / "ckpt_decoder.pt").exists() and json.loads((out / "decoder.done").read_text())["skipped"]
    phases = [json.loads(line)["phase"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "decoder_done" not in phases
    vae = AutoencoderKL.from_pretrained(str(shipped), torch_dtype=torch.float32)
    image = np.load(out / "data.npz")["images"][:2]
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    cached = torch.from_numpy(np.load(out / "latents.npz")["mean"][:2]).float()
    assert torch.allclose(cached, mean, atol=2e-3)
    assert decoder_runs_alongside(Recipe(threads=2, vae_from="shipped"), tmp_path / "elsewhere") is False

    # an autoencoder of another shape is refused before anything is written, naming the matching flags
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert world_train(["--out", str(bad), "--vae-from", "shipped", "--latent-channels", "6", "--vae-groups", "8"]) == 2
    err = capsys.readouterr().err
    assert "--latent-channels 4" in err and "--vae-groups 4" in err and "--vae-channels" not in err
    assert not bad.exists()
    assert world_train(["--out", str(tmp_path / "none"), "--vae-from", str(tmp_path)]) == 2
    assert "no AutoencoderKL there" in capsys.readouterr().err


# The options of `daamkit world train` and their defaults as the single-file train.py had them before
# it became a package (less the options removed then, below): the shipped model's recipe.
HEAD_DEFAULTS = {
    "out": "runs/world_train",
    "export_to": None,
    "resume": False,
    "only": None,
    "threads": max(1, (os.cpu_count() or 2)),
    "unet_workers": None,
    "data_workers": None,
    "seed": 0,
    "device": "cpu",
    "data_seed": 0,
    "dataset_size": 40000,
    "ckpt_minutes": 4.0,
    "sample_steps": 20,
    "latent_channels": 4,
    "vae_from": None,
    "vae_channels": "16,32,64",
    "vae_layers": 1,
    "vae_groups": 4,
    "vae_steps": 100000,
    "vae_minutes": 12.0,
    "vae_batch": 8,
    "vae_lr": 1e-3,
    "vae_kl": 3e-5,
    "vae_edge": 1.0,
    "decoder_minutes": 30.0,
    "decoder_alongside": None,
    "decoder_lr": 5e-4,
    "decoder_steps": 1000000,
    "unet_channels": "64,128,128",
    "unet_layers": 1,
    "unet_groups": 16,
    "heads": 4,
    "text_width": 64,
    "text_layers": 0,
    "unet_steps": 1000000,
    "unet_minutes": 95.0,
    "batch": 32,
    "lr": 1e-3,
    "final_lr_ratio": 0.05,
    "text_lr_mult": 1.0,
    "uncond_prob": 0.1,
    "min_snr": 5.0,
    "object_weight": 2.0,
    "ema": 0.998,
    "bf16": None,
    "ground_weight": 0.2,
    "object_count_weights": "1,2,3",
    "timestep_focus": "100,450,0.5",
}
# The removed options, at the default that left them out of training.
REMOVED_DEFAULTS = {
    "unet_time_norm": "default",
    "text_identity_init": False,
    "small_object_power": 0.0,
    "ground_detach_text": False,
    "position_shift": 0,
    "position_shift_from": 0.0,
}


def test_default_recipe_is_the_shipped_recipe():
    """``Recipe()`` holds every option with its earlier default (and type: ``args.json`` records them),
    the command line parses to it, the removed options are gone from it, and the options the shipped
    model recorded in its ``daamkit_world.json`` are the defaults, but for the session's own."""
    from daamkit.cli import CLIError, build_parser
    from daamkit.world import default_model_path
    from daamkit.world.train import RETIRED_OPTIONS, SESSION_OPTIONS, Recipe, bf16_native, option_names

    default = Recipe().as_dict()
    assert default == HEAD_DEFAULTS
    assert {k: type(v) for k, v in default.items()} == {k: type(v) for k, v in HEAD_DEFAULTS.items()}
    assert list(default) == list(option_names())

    parsed = vars(build_parser().parse_args(["world", "train"]))
    assert {k: parsed[k] for k in option_names()} == default
    assert RETIRED_OPTIONS == REMOVED_DEFAULTS
    for key in REMOVED_DEFAULTS:
        assert key not in parsed
        with pytest.raises(CLIError, match="unrecognized arguments"):
            build_parser().parse_args(["world", "train", "--" + key.replace("_", "-"), "1"])

    shipped = json.loads((default_model_path() / "daamkit_world.json").read_text())["config"]
    compared = 0
    for key, value in shipped.items():
        if key in RETIRED_OPTIONS:
            assert value == RETIRED_OPTIONS[key], key
        elif key == "bf16":  # recorded as resolved: the default where bf16 is native, as it was there
            assert value is True and default[key] is None and bf16_native(cpu_flags="flags\t: avx512_bf16")
        elif key not in SESSION_OPTIONS:
            assert default[key] == value, key
            compared += 1
    assert compared >= 35


def test_resume_keeps_the_recorded_options_unless_given_again(tmp_path, capsys):
    from daamkit.cli import build_parser
    from daamkit.world.train import RETIRED_OPTIONS, Recipe, adopt_record

    recorded = Recipe(lr=5e-4, unet_minutes=200, threads=1, object_count_weights="1,1,1").as_dict()
    del recorded["timestep_focus"]  # a run started before the option existed
    recorded.update(RETIRED_OPTIONS)  # and recorded options since removed, at the value they now always have
    r, changes = adopt_record(Recipe(resume=True, threads=2), recorded, given={"threads"})
    assert changes == {}
    assert (r.lr, r.unet_minutes, r.object_count_weights) == (5e-4, 200, "1,1,1")  # the record's, not the defaults
    assert r.timestep_focus == "100,450,0.5"  # not recorded: today's default
    assert r.threads == 2  # this call's own

    # given again, the command line wins, also where it spells out today's default
    again = Recipe(resume=True, object_count_weights="1,2,3", lr=5e-4, text_lr_mult=3)
    r, changes = adopt_record(again, recorded, {"object_count_weights", "lr", "text_lr_mult"})
    assert changes == {"object_count_weights": ["1,1,1", "1,2,3"], "text_lr_mult": [1.0, 3.0]}
    assert (r.object_count_weights, r.lr, r.text_lr_mult, r.unet_minutes) == ("1,2,3", 5e-4, 3.0, 200)

    # the architecture cannot change
    with pytest.raises(ValueError, match="--heads 2 contradicts this run's args.json"):
        adopt_record(Recipe(resume=True, heads=2), recorded, {"heads"})
    # and a run that used a removed option cannot go on as it was
    for key, value in (("position_shift", 3), ("text_identity_init", True), ("unet_time_norm", "scale_shift")):
        with pytest.raises(ValueError, match=f"--{key.replace('_', '-')} {value}: that option is gone"):
            adopt_record(Recipe(resume=True), {**recorded, key: value}, set())
    out = tmp_path / "old"
    out.mkdir()
    (out / "args.json").write_text(json.dumps({**recorded, "position_shift": 3}))
    capsys.readouterr()
    assert world_train(["--out", str(out), "--resume", "--threads", "1"]) == 2
    assert "--position-shift 3" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["args.json"]

    # `daamkit world train` notes the options given on its command line
    cli = build_parser().parse_args(["world", "train", "--lr", "3e-4", "--no-bf16", "--resume"])
    assert cli.given_options == ["bf16", "lr"]


@pytest.mark.slow
def test_unet_workers_train_the_same_model_as_one_process(tmp_path, monkeypatch, capfd):
    """Data-parallel workers each compute their part of the batch one process would draw, and average
    the gradients: after a few steps the weights match those of one process, up to float32 rounding.
    Workers that start without grounding targets get them built once, before they are spawned (each
    building its own raced on one file: a worker read it half-written)."""
    import shutil

    import numpy as np
    import torch

    from daamkit.world.train import Recipe, build_unet_and_text, option_names

    one = tmp_path / "one"
    # The two runs may differ only in the order of float32 sums, on any CPU:
    # - float32 (--no-bf16): bf16 autocast rounds each part of a split batch on its own;
    # - a time budget too large to matter: the learning rate follows the larger of the step and the
    #   time fractions of the phase, and the workers' start-up counts against the time budget, so on a
    #   slow machine their first steps ran at a larger rate than the one process's did;
    # - 4 channels per GroupNorm group (as in the default UNet), not 1: a norm of single channels
    #   cancels every per-channel constant before it (conv biases, the timestep projections), whose
    #   true gradient is then 0, and Adam turns the rounding noise of a zero gradient into steps of the
    #   learning rate's size with a random sign.
    steps = ["--unet-steps", "4", "--unet-minutes", "1e9", "--no-decoder-alongside", "--no-bf16"]
    common = [*steps, *_TINY, "--unet-groups", "4"]
    assert world_train(["--out", str(one), "--threads", "1", *common]) == 0
    two = tmp_path / "two"
    shutil.copytree(
        one, two, ignore=shutil.ignore_patterns("ckpt_unet.pt", "unet.done", "log.jsonl", "model", "ground.npz")
    )
    monkeypatch.chdir(tmp_path)  # a relative --out, as on the command line, must reach the workers
    capfd.readouterr()
    assert world_train(["--out", "two", "--resume", "--only", "unet", "--threads", "2", "--unet-workers", "2"]) == 0
    assert capfd.readouterr().err.count("captions aligned") == 1  # built once, not by each worker
    for key in ("masks", "bits"):
        assert np.array_equal(np.load(one / "ground.npz")[key], np.load(two / "ground.npz")[key])
    done = json.loads((two / "unet.done").read_text())
    assert done["workers"] == 2
    assert not done["bf16"]  # the recorded --no-bf16 was kept
    assert json.loads((one / "unet.done").read_text())["workers"] == 1
    a, b = (torch.load(d / "ckpt_unet.pt", weights_only=False) for d in (one, two))
    assert a["step"] == b["step"] == 4
    # Weights are compared by how far they moved. float32 summation order leaves the two runs about 1e-6
    # of that apart; a worker with a wrong part of the batch (or the whole batch of another worker), or
    # gradients not averaged, leaves them about as far apart as training moves them
    recorded = json.loads((one / "args.json").read_text())
    r = Recipe(**{k: v for k, v in recorded.items() if k in option_names()})
    torch.manual_seed(r.seed)
    unet, te = build_unet_and_text(r)
    for part, init in (("unet", unet.state_dict()), ("text", te.state_dict())):
        moved = torch.cat([(a[part][k] - init[k]).abs().flatten() for k in init])
        apart = torch.cat([(b[part][k] - a[part][k]).abs().flatten() for k in init])
        assert moved.mean() > 1e-6
        assert apart.mean() < 1e-3 * moved.mean(), (part, apart.mean(), moved.mean())
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in log if r["phase"] == "unet_done"] == [2]


def test_capture_cross_attention_keeps_the_maps_and_the_output():
    """The training processor of the cross-attention layers gives the output of diffusers' own and
    keeps each call's attention probabilities, with their gradient, for the grounding loss."""
    import torch
    from diffusers.models.attention_processor import Attention

    from daamkit.world.train.grounding import CaptureCrossAttention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    x = torch.randn(2, 64, 16)
    text = torch.randn(2, 77, 8, requires_grad=True)
    store: list = []
    out = CaptureCrossAttention(store)(attn, x, encoder_hidden_states=text)
    torch.testing.assert_close(out, attn.processor(attn, x, encoder_hidden_states=text))
    ((heads, probs),) = store
    assert heads == 2 and probs.shape == (2 * 2, 64, 77)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 64))
    probs[..., 3].sum().backward()
    assert text.grad.abs().sum() > 0
