"""Tiny offline pipelines of the newer diffusers families, one module per family.

Each module builds its family's pipelines the way diffusers' own pipeline tests build dummy components
(small widths, one or two layers, every block kind of the real denoiser kept), seeded and in fp32 on the
CPU, and writes the family's tokenizers to a folder: trained here on a tiny vocabulary but with the real
special tokens and chat template, so that each pipeline's own prompt-encoding code runs unchanged.
"""
