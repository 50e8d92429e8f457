"""Builders for tests and benchmarks, never imported by the library itself.

- :mod:`daamkit.testing.tokenizers`: Stable Diffusion's CLIP tokenizer (real ids) and a small T5
  sentencepiece tokenizer, both built offline.
- :mod:`daamkit.testing.pipelines`: tiny random pipelines of each supported family (diffusers' test sizes).
- :mod:`daamkit.testing.configs`: the released configs of full-size pipelines and random-weight builds
  of them, for benchmarks.
"""
