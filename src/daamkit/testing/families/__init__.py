"""Tiny offline pipelines of the model families beyond SD/SDXL/SD3/Flux, one module per family.

Each module builds a complete diffusers pipeline with small random weights (fp32, CPU, seeded) the way
diffusers' own pipeline tests build dummy components, plus the family's tokenizer(s) trained here on a
tiny vocabulary with the real special tokens and chat template, so the pipeline's own prompt-encoding
code runs unchanged. Nothing is downloaded.
"""
