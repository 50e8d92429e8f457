"""FLUX.1 Kontext: ``FluxKontextPipeline`` on the Flux transformer, built offline from the components of
:func:`daamkit.testing.pipelines.tiny_flux` (CLIP + T5 tokenizers of :mod:`daamkit.testing.tokenizers`).

Kontext appends the reference image's tokens after the generated image's tokens, so with ``image=`` the
transformer sees more image tokens than the output grid has. Two call arguments matter at test size: the
pipeline always rescales the output to ``max_area`` pixels (default 1024**2, whatever ``height``/``width`` say),
and ``_auto_resize=True`` (default) resizes the reference image to one of Kontext's ~1 MP training resolutions;
pass ``max_area=height * width`` and ``_auto_resize=False`` to stay tiny.
"""

from __future__ import annotations

from daamkit.testing.pipelines import tiny_flux


def tiny_flux_kontext(clip_dir: str, t5_dir: str, seed: int = 0):
    """``FluxKontextPipeline`` sharing every component with ``tiny_flux(clip_dir, t5_dir, seed)``."""
    from diffusers import FluxKontextPipeline

    c = tiny_flux(clip_dir, t5_dir, seed).components
    pipe = FluxKontextPipeline(
        scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"], transformer=c["transformer"],
        image_encoder=None, feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
