import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> str:
    """A directory with Stable Diffusion's CLIP tokenizer (real ids), built offline."""
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer")
    clip_tokenizer(d)
    return str(d)


@pytest.fixture(scope="session")
def clip_tokenizer_2_dir(tmp_path_factory) -> str:
    """SDXL's second tokenizer: same vocabulary, pads with '!' (id 0)."""
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer_2")
    clip_tokenizer(d, pad_token="!")
    return str(d)


@pytest.fixture(scope="session")
def sd_tokenizer(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir)


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory) -> str:
    """A T5 sentencepiece tokenizer trained here on a small vocabulary (the Flux/SD3 code path)."""
    from daamkit.testing.tokenizers import t5_tokenizer

    d = tmp_path_factory.mktemp("t5_tokenizer")
    t5_tokenizer(str(d))
    return str(d)


@pytest.fixture()
def sd3(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir):
    from daamkit.testing.pipelines import tiny_sd3

    return tiny_sd3(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir)


@pytest.fixture()
def flux(clip_tokenizer_dir, t5_tokenizer_dir):
    from daamkit.testing.pipelines import tiny_flux

    return tiny_flux(clip_tokenizer_dir, t5_tokenizer_dir)


@pytest.fixture()
def sdxl(clip_tokenizer_dir, clip_tokenizer_2_dir):
    from daamkit.testing.pipelines import tiny_sdxl

    return tiny_sdxl(clip_tokenizer_dir, clip_tokenizer_2_dir)
