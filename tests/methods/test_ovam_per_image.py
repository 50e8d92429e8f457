"""OVAM with one attribution prompt per image (``OvamMethod(per_image=...)``, what ``for_images`` builds
for an evaluation): each image's maps are those of its own words, as if traced alone."""

from __future__ import annotations

import pytest
import torch

from daamkit import trace
from daamkit.errors import InputError
from daamkit.methods import METHODS, OvamMethod
from daamkit.testing.pipelines import tiny_sd

PROMPTS = ["a red dog on a bench", "a cat under a tree"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer_ovam_pi")
    clip_tokenizer(d)
    return tiny_sd(str(d))


def run(pipe, prompts, seeds):
    return pipe(list(prompts), num_inference_steps=2, height=32, width=48, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_each_image_gets_its_own_words_as_if_traced_alone(sd):
    words = [["red", "dog", "red", "bench"], ["tree", "cat"]]
    with trace(sd, methods=[OvamMethod.for_images(words)]) as tc:
        images = run(sd, PROMPTS, [0, 1])
        batch = [tc.heat_maps(i, method="ovam") for i in range(2)]
    assert batch[0].words == ["red", "dog", "bench"] and batch[1].words == ["tree", "cat"]
    assert batch[0].maps.shape[0] == 6 and batch[1].maps.shape[0] == 4  # start and end tokens included
    assert batch[0].meta["attribution_prompt"] == "red dog red bench"
    # a repeated word keeps its occurrences apart, as in a prompt
    first, second = batch[0].word("red", occurrence=0), batch[0].word("red", occurrence=1)
    assert not torch.allclose(first.value, second.value)
    # the padded softmax of the shorter prompt equals that prompt's softmax alone
    for i in range(2):
        with trace(sd, methods=[OvamMethod(per_image=[words[i]])]) as tc1:
            alone = run(sd, [PROMPTS[i]], [i])
            single = tc1.heat_maps(0, method="ovam")
        assert alone[0] == pytest.approx(images[i], abs=1e-5)
        assert torch.allclose(single.maps, batch[i].maps, atol=1e-5, rtol=1e-4)
    # distinct words: the same maps as the shared attribution prompt
    with trace(sd, open_vocabulary=["tree", "cat"]) as tc2:
        run(sd, [PROMPTS[1]], [1])
        shared = tc2.heat_maps(0, method="ovam")
    assert torch.allclose(shared.maps, batch[1].maps, atol=1e-5, rtol=1e-4)


def test_bad_per_image_words_give_one_clear_error(sd):
    before = hook_count(sd.unet)
    with pytest.raises(InputError, match="either for all images"):
        OvamMethod(["dog"], per_image=[["cat"]])
    with pytest.raises(InputError, match="one list of words per image"):
        OvamMethod(per_image=["cat", "dog"])
    with pytest.raises(InputError, match="non-empty list"):
        OvamMethod(per_image=[["cat"], []])
    with pytest.raises(InputError, match=r"words for 1 image\(s\).*makes 2"), \
            trace(sd, methods=[OvamMethod(per_image=[["cat"]])]):
        run(sd, PROMPTS, [0, 1])
    assert hook_count(sd.unet) == before


def test_every_method_can_be_built_for_images():
    words = [["red", "circle"], ["blue", "square", "red"]]
    for name, cls in METHODS.items():
        method = cls.for_images(words)
        assert method.name == name
    assert METHODS["concept"].for_images(words).concepts == ["red", "circle", "blue", "square"]
