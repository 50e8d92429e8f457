"""Tiny offline pipelines of the newer diffusion-transformer families, one module per family.

Each module builds a complete diffusers pipeline (fp32, CPU, random weights at diffusers' test sizes but
with every block kind of the real model) and writes the tokenizer(s) it needs: trained here on a small
vocabulary, with the real special tokens and chat templates, so that the pipeline's own prompt code runs.
"""
