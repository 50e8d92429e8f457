"""The shapes-world training script end to end, on a toy budget: it must save a standard diffusers
folder that StableDiffusionPipeline loads offline and that generates an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_train_tiny_end_to_end(tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from daamkit.world.train import main

    # the text encoder's position ids as training hands them over (--position-shift 2 below)
    seen_positions = []
    plain_forward = CLIPTextModel.forward

    def spy(self, *a, position_ids=None, **kw):
        if position_ids is not None:
            seen_positions.append(position_ids.clone())
        return plain_forward(self, *a, position_ids=position_ids, **kw)

    monkeypatch.setattr(CLIPTextModel, "forward", spy)

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
        "--position-shift",
        "2",
        "--position-shift-from",
        "0.5",  # of 3 steps: the first two (fractions 0 and 1/3) plain, the last (2/3) shifted
        # the layered encoder's recipe (identity start, grounding kept off the text states) end to end;
        # the other tests train the default 0-layer one
        "--text-layers",
        "1",
        "--text-identity-init",
        "--ground-detach-text",
    ]
    assert main(argv) == 0
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["text_identity_init"] is True and recorded["ground_detach_text"] is True
    # one row per caption of the last step only (before --position-shift-from the encoder gets no
    # position ids, i.e. the plain 0..76): moved along by 0, 1 or 2 places, clamped at 76
    rows = torch.cat(seen_positions)
    assert len(rows) == 4
    shift = rows[:, 0]
    assert set(shift.tolist()) <= {0, 1, 2} and len(set(shift.tolist())) > 1
    expected = (torch.arange(77)[None] + shift[:, None]).clamp(max=76)
    assert torch.equal(rows, expected)
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
    from daamkit.world.train import GROUNDED_ROLES, _token_object_bits

    tok = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    multi = 0
    for seed in range(60):
        s = make_scene(seed, "train")
        ids = np.array(tok(s.caption, padding="max_length", max_length=77).input_ids)
        bits = _token_object_bits(s, tok, ids)
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
    from daamkit.world.train import add_arguments, bf16_native

    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni") is True
    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 amx_tile amx_bf16") is True
    assert bf16_native(cpu_flags="flags\t: fpu sse2 avx2 avx512f avx512_vnni") is False
    assert bf16_native(cpu_flags="flags\t: fpu avx512_bf16x") is False  # whole flags only
    assert bf16_native("meta", cpu_flags="flags\t: avx512_bf16") is False  # CPU flags say nothing of it
    import argparse

    p = add_arguments(argparse.ArgumentParser())
    assert p.parse_args([]).bf16 is None
    assert p.parse_args(["--bf16"]).bf16 is True and p.parse_args(["--no-bf16"]).bf16 is False


_TINY = (
    "--dataset-size 24 --vae-channels 8,8,8 --vae-steps 2 --vae-batch 4 --unet-channels 16,16,16 --heads 2 "
    "--text-width 16 --batch 4 --decoder-steps 3 --sample-steps 0"
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
    assert main(["world", "train", "--out", str(out), "--threads", "2", "--unet-steps", "150", *extra, *_TINY]) == 0
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
        assert len(handover) == 1 and handover[0]["workers"] == 2 and 0 < handover[0]["step"] < 150
        done = json.loads((out / "unet.done").read_text())
        assert done["steps"] == 150 and done["workers"] == 2
        assert not list(out.glob(".unet_workers_*"))  # the rendezvous file is gone
    assert (out / "model" / "vae" / "config.json").exists()
    # what the run records is this script's options, not the CLI's dispatch function
    recorded = json.loads((out / "args.json").read_text())
    assert "func" not in recorded and recorded["threads"] == 2
    card = json.loads((out / "model" / "daamkit_world.json").read_text())
    assert card["config"] == recorded


def test_a_failed_unet_phase_stops_the_decoder_process(tmp_path, monkeypatch):
    """An exception in the UNet phase must not leave the decoder process running."""
    from daamkit.world import train

    seen = {}

    def failing_unet(args, out, log, alongside=None):
        seen["alongside"] = alongside
        assert alongside is not None and alongside.running()
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "phase_unet", failing_unet)
    with pytest.raises(RuntimeError, match="boom"):
        train.main(["--out", str(tmp_path / "run"), "--threads", "2", "--unet-steps", "3", *_TINY])
    assert not seen["alongside"].running()
    assert not (tmp_path / "run" / "decoder.done").exists()


def test_decoder_alongside_default():
    """On by default with a spare core (or a UNet on another device), off with one thread, never when
    the decoder phase is skipped or already done."""
    import argparse

    from daamkit.world.train import _decoder_alongside, add_arguments

    p = add_arguments(argparse.ArgumentParser())
    assert p.parse_args([]).decoder_alongside is None
    assert _decoder_alongside(p.parse_args(["--threads", "2"]), Path("/nonexistent"))
    assert not _decoder_alongside(p.parse_args(["--threads", "1"]), Path("/nonexistent"))
    assert _decoder_alongside(p.parse_args(["--threads", "1", "--device", "cuda"]), Path("/nonexistent"))
    assert _decoder_alongside(p.parse_args(["--threads", "1", "--decoder-alongside"]), Path("/nonexistent"))
    assert not _decoder_alongside(p.parse_args(["--no-decoder-alongside"]), Path("/nonexistent"))
    assert not _decoder_alongside(p.parse_args(["--threads", "2", "--decoder-minutes", "0"]), Path("/nonexistent"))


def test_object_count_weights_sample_scenes_by_their_number_of_objects(tmp_path):
    """``--object-count-weights`` draws scenes of 1, 2 and 3 objects in proportion to their weights
    (object counts are read from the grounding targets' per-object masks); the default is 1,2,3;
    1,1,1 draws uniformly from the same random stream as before the option existed; bad weights are
    refused up front."""
    import argparse

    import numpy as np

    from daamkit.world.train import _scene_sampler, add_arguments, main

    n = 300
    masks = np.zeros((n, 3, 16, 16), np.uint8)
    count = np.repeat([1, 2, 3], n // 3)
    for i, c in enumerate(count):
        masks[i, :c, 4:8, 4:8] = 255
    np.savez(tmp_path / "ground.npz", masks=masks, bits=np.zeros((n, 77), np.uint8))
    p = add_arguments(argparse.ArgumentParser())

    pick = _scene_sampler(p.parse_args(["--object-count-weights", "1,2,3"]), tmp_path, n)
    share = np.bincount(count[pick(np.random.default_rng(0), 60_000)], minlength=4)[1:] / 60_000
    assert np.allclose(share, [1 / 6, 2 / 6, 3 / 6], atol=0.01), share
    only_three = _scene_sampler(p.parse_args(["--object-count-weights", "0,0,1"]), tmp_path, n)
    assert set(count[only_three(np.random.default_rng(1), 500)]) == {3}

    default = _scene_sampler(p.parse_args([]), tmp_path, n)
    assert (default(np.random.default_rng(3), 64) == pick(np.random.default_rng(3), 64)).all()

    uniform = _scene_sampler(p.parse_args(["--object-count-weights", "1,1,1"]), tmp_path / "missing", n)
    assert (uniform(np.random.default_rng(7), 32) == np.random.default_rng(7).integers(0, n, 32)).all()

    out = tmp_path / "run"
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        assert main(["--out", str(out), "--object-count-weights", bad]) == 2
    assert not out.exists()


def test_ground_targets_are_needed_by_each_option_that_reads_them(tmp_path):
    """The grounding loss, the small-object weights and the object-count sampler each read
    ``ground.npz``; the data-parallel launcher builds it before spawning its workers exactly when one
    of them is on, and a run with none of them trains without the file."""
    import argparse

    import numpy as np

    from daamkit.world.train import _needs_ground_targets, _scene_sampler, add_arguments

    p = add_arguments(argparse.ArgumentParser())
    none = ["--ground-weight", "0", "--object-count-weights", "1,1,1"]
    assert not _needs_ground_targets(p.parse_args(none))
    assert _needs_ground_targets(p.parse_args([]))  # the default recipe: grounding and 1,2,3 weights
    assert _needs_ground_targets(p.parse_args(["--ground-weight", "0.2", "--object-count-weights", "1,1,1"]))
    assert _needs_ground_targets(p.parse_args(["--ground-weight", "0", "--object-count-weights", "1,2,3"]))
    assert _needs_ground_targets(p.parse_args([*none, "--small-object-power", "1"]))
    # without the file, the sampler of a run that does not need it still draws
    assert len(_scene_sampler(p.parse_args(none), tmp_path / "missing", 10)(np.random.default_rng(0), 4)) == 4


def test_timestep_focus_draws_its_share_from_its_range(tmp_path):
    """``--timestep-focus LO,HI,SHARE`` draws about SHARE of the timesteps from [LO, HI) on top of the
    uniform draw over [0, 1000); given empty, the draw is the plain uniform one, from the same random
    stream as before the option existed; bad specs are refused before anything is written."""
    import argparse

    import torch

    from daamkit.world.train import _timestep_sampler, add_arguments, main

    p = add_arguments(argparse.ArgumentParser())
    t = _timestep_sampler(p.parse_args(["--timestep-focus", "100,450,0.5"]))(100_000)
    assert t.min() >= 0 and t.max() < 1000
    inside = ((t >= 100) & (t < 450)).float().mean().item()
    assert abs(inside - (0.5 + 0.5 * 0.35)) < 0.01, inside
    assert ((t >= 450) & (t < 1000)).float().mean().item() == pytest.approx(0.5 * 0.55, abs=0.01)

    assert p.parse_args([]).timestep_focus == "100,450,0.5"  # the shipped model's recipe
    torch.manual_seed(5)
    plain = _timestep_sampler(p.parse_args(["--timestep-focus", ""]))(64)
    torch.manual_seed(5)
    assert torch.equal(plain, torch.randint(0, 1000, (64,)))

    out = tmp_path / "run"
    for bad in ("100,450", "450,100,0.5", "0,1001,0.5", "100,450,1.5", "a,b,c"):
        assert main(["--out", str(out), "--timestep-focus", bad]) == 2
    assert not out.exists()


def test_position_shift_moves_each_caption_and_leaves_the_plain_stream_alone(tmp_path):
    """``--position-shift N`` gives each caption of a batch its own shift in 0..N (clamped at the last
    position); 0 returns None (plain positions) without drawing, so the random stream of runs without
    the option is unchanged; out-of-range values are refused before anything is written."""
    import numpy as np
    import torch

    from daamkit.world.train import _shifted_positions, main

    gen = np.random.default_rng(0)
    assert _shifted_positions(gen, 8, 77, 0) is None
    assert gen.integers(0, 1000, 4).tolist() == np.random.default_rng(0).integers(0, 1000, 4).tolist()

    pos = _shifted_positions(np.random.default_rng(1), 4000, 77, 3)
    assert pos.shape == (4000, 77) and pos.dtype == torch.int64
    shift = pos[:, 0]
    counts = torch.bincount(shift, minlength=4)
    assert len(counts) == 4 and (counts > 900).all(), counts  # about uniform over 0..3
    assert torch.equal(pos, (torch.arange(77)[None] + shift[:, None]).clamp(max=76))
    assert pos.max() == 76

    out = tmp_path / "run"
    for bad in ("-1", "17"):
        assert main(["--out", str(out), "--position-shift", bad]) == 2
    for bad in ("-0.1", "1", "1.5"):
        assert main(["--out", str(out), "--position-shift", "3", "--position-shift-from", bad]) == 2
    assert not out.exists()


def test_object_loss_weights_can_favour_small_objects():
    """``--small-object-power`` 0 weighs every object cell alike (the shipped recipe: 1 + w on the
    objects' union); power 1 gives a small object the total extra weight of a medium one (16 cells),
    capped at 4x for specks, and leaves large objects as they were; overlapping objects take the
    larger weight, empty slots add nothing."""
    import torch

    from daamkit.world.train import object_loss_weights

    masks = torch.zeros(2, 3, 16, 16)
    masks[0, 0, 0:2, 0:2] = 1  # small: 4 cells
    masks[0, 1, 8:16, 8:16] = 1  # large: 64 cells
    masks[1, 0, 5, 5] = 0.25  # a speck: 0.25 cells

    flat = object_loss_weights(masks, 2.0, 0.0)
    assert flat.shape == (2, 1, 16, 16)
    assert flat[0, 0, 0, 0] == flat[0, 0, 10, 10] == 3.0 and flat[0, 0, 4, 4] == 1.0
    assert torch.isclose(flat[1, 0, 5, 5], torch.tensor(1.5))

    even = object_loss_weights(masks, 2.0, 1.0)
    extra = even - 1
    assert torch.isclose(extra[0, 0, 0:2, 0:2].sum(), torch.tensor(2.0 * 16))  # as much as a medium one
    assert torch.equal(even[0, 0, 8:16, 8:16], flat[0, 0, 8:16, 8:16])  # large: unchanged
    assert extra[0, 0, 4, 4] == 0
    assert torch.isclose(extra[1, 0, 5, 5], torch.tensor(2.0 * 0.25 * 4.0))  # capped at 4x

    masks[0, 1, 0:2, 0:2] = 1  # the large object now also covers the small one's cells
    assert torch.isclose(object_loss_weights(masks, 2.0, 1.0)[0, 0, 0, 0], torch.tensor(1 + 2.0 * 4.0))


def test_resume_keeps_the_recorded_options_unless_given_again():
    import argparse

    from daamkit.cli import build_parser
    from daamkit.world.train import _adopt_record, _own_args, add_arguments

    def parse(*argv):
        return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))

    recorded = _own_args(parse("--lr", "5e-4", "--unet-minutes", "200", "--threads", "1"))
    del recorded["object_count_weights"], recorded["timestep_focus"]  # runs started before the options existed
    args = parse("--resume", "--threads", "2")
    assert _adopt_record(args, recorded) == {}
    assert args.lr == 5e-4 and args.unet_minutes == 200  # the record's, not today's defaults
    assert args.object_count_weights == "1,1,1"  # what such runs did, not today's default (1,2,3)
    assert args.timestep_focus == ""  # uniform timesteps, as they were drawn then
    assert args.threads == 2  # this call's own

    # given again, the command line wins, also where it spells out today's default
    args = parse("--resume", "--object-count-weights", "1,2,3", "--lr", "5e-4", "--text-lr-mult", "3")
    assert _adopt_record(args, recorded) == {"object_count_weights": ["1,1,1", "1,2,3"], "text_lr_mult": [1.0, 3.0]}
    assert (args.object_count_weights, args.lr, args.text_lr_mult) == ("1,2,3", 5e-4, 3.0)
    assert args.unet_minutes == 200

    # the architecture cannot change, and nothing is adopted when it is asked to
    args = parse("--resume", "--heads", "2")
    with pytest.raises(ValueError, match="--heads 2 contradicts this run's args.json"):
        _adopt_record(args, recorded)
    assert args.lr == 1e-3

    # `daamkit world train` notes the options given the same way
    cli = build_parser().parse_args(["world", "train", "--lr", "3e-4", "--no-bf16", "--resume"])
    assert cli.given_options == ["bf16", "lr"]


@pytest.mark.slow
def test_unet_workers_train_the_same_model_as_one_process(tmp_path, monkeypatch, capfd):
    """Data-parallel workers each compute their part of the batch one process would draw, and average
    the gradients: after a few steps the weights match those of one process, up to float rounding.
    Workers that start without grounding targets get them built once, before they are spawned (each
    building its own raced on one file: a worker read it half-written)."""
    import argparse
    import shutil

    import numpy as np
    import torch

    from daamkit.world.train import _build_unet_and_text, main

    one = tmp_path / "one"
    # float32 on every CPU: with bf16 autocast (the default where the CPU has it natively) the rounding
    # depends on how the batch is split, so even one process on 1 vs 2 threads ends about 9% of the
    # movement apart after 4 steps (2 workers: 13%), against 0.07% in float32 (measured 2026-11-29)
    common = ["--unet-steps", "4", "--no-decoder-alongside", "--no-bf16", *_TINY]
    assert main(["--out", str(one), "--threads", "1", *common]) == 0
    two = tmp_path / "two"
    shutil.copytree(
        one, two, ignore=shutil.ignore_patterns("ckpt_unet.pt", "unet.done", "log.jsonl", "model", "ground.npz")
    )
    monkeypatch.chdir(tmp_path)  # a relative --out, as on the command line, must reach the workers
    capfd.readouterr()
    assert main(["--out", "two", "--resume", "--only", "unet", "--threads", "2", "--unet-workers", "2"]) == 0
    assert capfd.readouterr().err.count("captions aligned") == 1  # built once, not by each worker
    for key in ("masks", "bits"):
        assert np.array_equal(np.load(one / "ground.npz")[key], np.load(two / "ground.npz")[key])
    done = json.loads((two / "unet.done").read_text())
    assert done["workers"] == 2
    assert not done["bf16"]  # the recorded --no-bf16 was kept
    assert json.loads((one / "unet.done").read_text())["workers"] == 1
    a, b = (torch.load(d / "ckpt_unet.pt", weights_only=False) for d in (one, two))
    assert a["step"] == b["step"] == 4
    # Adam turns float rounding in near-zero gradients into steps of the learning rate's size, so the
    # weights are compared by how far they moved: a worker with a wrong part of the batch (or the whole
    # batch of another worker) moves them about as far as training itself does
    args = argparse.Namespace(**json.loads((one / "args.json").read_text()))
    torch.manual_seed(args.seed)
    unet, te = _build_unet_and_text(args)
    for part, init in (("unet", unet.state_dict()), ("text", te.state_dict())):
        moved = torch.cat([(a[part][k] - init[k]).abs().flatten() for k in init])
        apart = torch.cat([(b[part][k] - a[part][k]).abs().flatten() for k in init])
        assert moved.mean() > 1e-6
        assert apart.mean() < 0.05 * moved.mean(), (part, apart.mean(), moved.mean())
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in log if r["phase"] == "unet_done"] == [2]


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
    import argparse

    from daamkit.world.train import add_arguments, unet_workers

    p = add_arguments(argparse.ArgumentParser())
    assert unet_workers(p.parse_args(["--threads", "2"])) == 2
    assert unet_workers(p.parse_args(["--threads", "1"])) == 1
    assert unet_workers(p.parse_args(["--threads", "2", "--unet-workers", "1"])) == 1
    assert unet_workers(p.parse_args(["--threads", "3"])) == 2  # 3 does not divide the batch of 32
    assert unet_workers(p.parse_args(["--threads", "4", "--unet-workers", "8"])) == 4  # not above --threads
    assert unet_workers(p.parse_args(["--threads", "4", "--device", "cuda"])) == 1


def test_text_identity_init_starts_as_the_zero_layer_encoder():
    """``--text-identity-init``: a fresh encoder with a layer gives exactly the 0-layer encoder's output
    for the same embeddings, and still learns (its zeroed projections get a gradient)."""
    import argparse

    import torch

    from daamkit.world.train import _build_unet_and_text, add_arguments

    p = add_arguments(argparse.ArgumentParser())
    tiny = ["--unet-channels", "16,16,16", "--heads", "2", "--text-width", "16"]
    torch.manual_seed(0)
    _, layered = _build_unet_and_text(p.parse_args(["--text-layers", "1", "--text-identity-init", *tiny]))
    _, plain = _build_unet_and_text(p.parse_args(["--text-layers", "0", *tiny]))
    plain.load_state_dict({k: v for k, v in layered.state_dict().items() if "encoder.layers" not in k})
    ids = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layered(ids)[0], plain(ids)[0], rtol=0, atol=0)
    layered(ids)[0].pow(2).sum().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in layered.named_parameters() if "out_proj" in n or "fc2" in n)
    torch.manual_seed(0)
    _, random_start = _build_unet_and_text(p.parse_args(["--text-layers", "1", *tiny]))
    assert (random_start(ids)[0] - plain(ids)[0]).abs().max() > 1e-3  # without the option: not the identity


def test_ground_detach_text_keeps_the_grounding_maps_off_the_text_states():
    """``--ground-detach-text``: the attention maps kept for the grounding loss have the same values,
    the layer's output is unchanged, the UNet's key projection still learns from them, but no gradient
    reaches the text states through them."""
    import torch
    from diffusers.models.attention_processor import Attention

    from daamkit.world.train import _CaptureCrossAttention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    x = torch.randn(2, 64, 16)
    grads, outs, maps = {}, {}, {}
    for detach in (False, True):
        text = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        store: list = []
        attn.zero_grad()
        outs[detach] = _CaptureCrossAttention(store, detach_text=detach)(attn, x, encoder_hidden_states=text)
        (heads, probs), = store
        maps[detach] = probs.detach()
        probs[..., 3].sum().backward()  # a grounding-like loss on one token's map
        grads[detach] = (text.grad, attn.to_k.weight.grad.clone())
    torch.testing.assert_close(outs[True], outs[False])
    torch.testing.assert_close(maps[True], maps[False])
    assert grads[False][0].abs().sum() > 0
    assert grads[True][0] is None or grads[True][0].abs().sum() == 0
    torch.testing.assert_close(grads[True][1], grads[False][1])
    assert grads[True][1].abs().sum() > 0


def test_unet_time_norm_scale_shift_makes_the_timestep_scale_and_shift_the_features():
    """``--unet-time-norm scale_shift``: each ResNet's timestep projection gives a scale and a shift
    (twice its channels), and the model still runs and depends on the timestep."""
    import argparse

    import torch

    from daamkit.world.train import _build_unet_and_text, add_arguments

    p = add_arguments(argparse.ArgumentParser())
    tiny = ["--unet-channels", "16,16,16", "--heads", "2", "--text-width", "16"]
    torch.manual_seed(0)
    unet, text = _build_unet_and_text(p.parse_args(["--unet-time-norm", "scale_shift", *tiny]))
    plain, _ = _build_unet_and_text(p.parse_args(tiny))
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    assert plain.config.resnet_time_scale_shift == "default"
    proj = unet.down_blocks[0].resnets[0].time_emb_proj
    assert proj.out_features == 2 * plain.down_blocks[0].resnets[0].time_emb_proj.out_features
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    states = text(ids)[0]
    a = unet(x, torch.tensor([10, 10]), states).sample
    b = unet(x, torch.tensor([900, 900]), states).sample
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3
    with pytest.raises(SystemExit):
        p.parse_args(["--unet-time-norm", "adagn"])


def test_data_workers_render_the_same_training_set(tmp_path):
    """Scenes rendered by two spawned processes are the ones one process renders, in seed order,
    for the data phase and for the grounding targets it writes with them; and the targets are those
    rendered again for a data folder that lacks them."""
    import argparse
    import shutil

    import numpy as np

    from daamkit.world import train as T
    from daamkit.world.scenes import make_scene

    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        argv = ["--out", str(out), "--only", "data", "--threads", "1", "--dataset-size", "10"]
        assert T.main([*argv, "--data-workers", str(workers)]) == 0
        assert (out / "ground.npz").exists()  # written by the data phase itself
        outs[workers] = out
    again = tmp_path / "again"
    shutil.copytree(outs[1], again, ignore=shutil.ignore_patterns("ground.npz"))
    T._ground_targets(argparse.Namespace(**{**T._default_args(), "data_workers": 2}), again)
    assert len(T._chunks(10, 2)) == 2  # so the second run really went through two processes
    for name, other in (("data.npz", outs[2]), ("ground.npz", outs[2]), ("ground.npz", again)):
        one, two = np.load(outs[1] / name), np.load(other / name)
        assert one.files == two.files
        for key in one.files:
            assert len(one[key]) == 10 and np.array_equal(one[key], two[key]), (name, other.name, key)
    captions = (outs[2] / "captions.txt").read_text().splitlines()
    assert captions == [make_scene(i, "train").caption for i in range(10)]
    ids = np.load(outs[2] / "data.npz")["input_ids"]
    tok = T._tokenizer(outs[2])
    assert np.array_equal(ids, tok(captions, padding="max_length", max_length=77, return_tensors="np").input_ids)
    assert np.load(outs[2] / "ground.npz")["bits"].any(axis=1).all()  # every caption's words grounded


def test_vae_from_takes_a_trained_autoencoder_whole(tmp_path, capsys):
    """`--vae-from shipped`: no VAE or decoder training; the latents are the shipped encoder's, at its
    scaling factor, and the exported pipeline carries the shipped autoencoder unchanged."""
    import argparse

    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from daamkit.world import default_model_path
    from daamkit.world import train as T

    shipped = default_model_path() / "vae"
    out = tmp_path / "run"
    small_unet = ["--unet-channels", "16,16,16", "--heads", "2", "--text-width", "16", "--batch", "4"]
    argv = ["--out", str(out), "--threads", "1", "--dataset-size", "12", "--unet-steps", "1", *small_unet]
    assert T.main([*argv, "--sample-steps", "0", "--vae-from", "shipped"]) == 0

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
    two_threads = argparse.Namespace(**{**T._default_args(), "threads": 2, "vae_from": "shipped"})
    assert T._decoder_alongside(two_threads, tmp_path / "elsewhere") is False

    # an autoencoder of another shape is refused before anything is written, naming the matching flags
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert T.main(["--out", str(bad), "--vae-from", "shipped", "--latent-channels", "6", "--vae-groups", "8"]) == 2
    err = capsys.readouterr().err
    assert "--latent-channels 4" in err and "--vae-groups 4" in err and "--vae-channels" not in err
    assert not bad.exists()
    assert T.main(["--out", str(tmp_path / "none"), "--vae-from", str(tmp_path)]) == 2
    assert "no AutoencoderKL there" in capsys.readouterr().err
