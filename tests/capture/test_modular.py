"""Modular pipelines (``*ModularPipeline``) wrapping a supported denoiser: their guider runs the
negative prompt as a separate denoiser call, conditional first."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from daamkit import trace
from daamkit.errors import DaamkitError

warnings.filterwarnings("ignore", message="Guiders are currently an experimental")

PROMPT = "a red dog on a bench"


def modular(blocks_cls, pipe):
    import diffusers.modular_pipelines as mpl

    mp = getattr(mpl, blocks_cls)().init_pipeline()
    mp.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    return mp


def test_modular_sdxl_with_cfg_gives_the_standard_pipelines_maps(sdxl):
    mp = modular("StableDiffusionXLAutoBlocks", sdxl)
    kw = dict(prompt=PROMPT, negative_prompt="a blurry cat", num_inference_steps=2, height=32, width=32)
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mp.unet.modules())
    ref = mp(**kw, generator=torch.Generator().manual_seed(0), output="images")
    with trace(mp, negative=True) as tc:
        out = mp(**kw, generator=torch.Generator().manual_seed(0), output="images")
        modular_maps = tc.heat_maps(0).maps
        assert tc.num_steps == 2
        assert tc.heat_maps(0).words == ["a", "red", "dog", "on", "bench"]
        assert tc.heat_maps(0, branch="negative").words == ["a", "blurry", "cat"]
    assert np.array_equal(np.asarray(out[0]), np.asarray(ref[0]))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mp.unet.modules()) == before
    with trace(sdxl) as tc:
        sdxl(**kw, generator=torch.Generator().manual_seed(0))
        standard = tc.heat_maps(0).maps
    # the same attention, batched [uncond, cond] in one call there, one call each here
    torch.testing.assert_close(modular_maps, standard, rtol=1e-3, atol=1e-4)


def test_modular_flux_is_traced(flux):
    mp = modular("FluxAutoBlocks", flux)
    kw = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=48, max_sequence_length=16)
    with trace(mp) as tc:
        mp(**kw, generator=torch.Generator().manual_seed(0), output="images")
        maps = tc.heat_maps(0).maps
    with trace(flux) as tc:
        flux(**kw, generator=torch.Generator().manual_seed(0), output_type="np")
        torch.testing.assert_close(maps, tc.heat_maps(0).maps, rtol=1e-4, atol=1e-6)


def test_guiders_with_more_than_two_predictions_are_refused(sdxl):
    from diffusers.guiders import PerturbedAttentionGuidance

    mp = modular("StableDiffusionXLAutoBlocks", sdxl)
    mp.update_components(guider=PerturbedAttentionGuidance(perturbed_guidance_layers=[0]))
    with pytest.raises(DaamkitError, match="PerturbedAttentionGuidance predicts"):
        trace(mp)
