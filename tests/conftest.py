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


@pytest.fixture(scope="session")
def sd_tokenizer_2(clip_tokenizer_2_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_2_dir)


@pytest.fixture(scope="session")
def t5_tokenizer(t5_tokenizer_dir):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(t5_tokenizer_dir)


# A fresh pipeline per test (tests may change one), sharing the session's loaded tokenizers, which
# pipelines only read
@pytest.fixture()
def sd3(sd_tokenizer, sd_tokenizer_2, t5_tokenizer):
    from daamkit.testing.pipelines import tiny_sd3

    return tiny_sd3(sd_tokenizer, sd_tokenizer_2, t5_tokenizer)


@pytest.fixture()
def flux(sd_tokenizer, t5_tokenizer):
    from daamkit.testing.pipelines import tiny_flux

    return tiny_flux(sd_tokenizer, t5_tokenizer)


@pytest.fixture()
def sdxl(sd_tokenizer, sd_tokenizer_2):
    from daamkit.testing.pipelines import tiny_sdxl

    return tiny_sdxl(sd_tokenizer, sd_tokenizer_2)
