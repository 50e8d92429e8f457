"""Tiny offline pipelines of the newer model families, one module per family (diffusers' test sizes).

Each module builds its family's tokenizer(s) offline, with the real special tokens and chat template, and a
complete randomly initialised pipeline (fp32, CPU, seeded) whose own prompt-encoding code runs unchanged.
"""
