import pytest

from daamkit.testing.pipelines import tiny_sd


@pytest.fixture(scope="module")
def pipe(clip_tokenizer_dir):
    """A tiny random Stable Diffusion pipeline, shared by the tests of one module."""
    return tiny_sd(clip_tokenizer_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pipe):
    """That pipeline saved as a model folder, for the app's loader."""
    d = tmp_path_factory.mktemp("tiny_sd_ui")
    pipe.save_pretrained(d)
    return d
