"""``daamkit generate --relations``: relation plots and arrays in the run folder, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from daamkit.cli import main
from daamkit.io.relations import load_relation_arrays
from daamkit.testing.pipelines import tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_tokenizer_dir):
    d = tmp_path_factory.mktemp("tiny_sd_rel")
    tiny_sd(clip_tokenizer_dir).save_pretrained(d)
    return str(d)


def _generate(sd_dir, out, *extra):
    return main(["generate", "a red dog on a bench", "--model", sd_dir, "--steps", "2", "--size", "48x32",
                 "--out", str(out), "--no-progress", *extra])


def test_image_relation_from_a_point_writes_plot_and_arrays(sd_dir, tmp_path, capsys):
    out = tmp_path / "point"
    assert _generate(sd_dir, out, "--relations", "image->image", "--query", "40,8") == 0
    assert (out / "relations" / "image_image.png").is_file()
    doc, tensors = load_relation_arrays(out / "relations" / "image_image")
    assert doc["kind"] == "image->image" and doc["image_size"] == [32, 48]
    assert doc["queries"][0]["point_yx"] == [8.0, 40.0]  # X,Y on the command line is (y, x) inside
    maps = tensors["maps"]
    record = json.loads((out / "record.json").read_text())
    assert maps.shape[0] == 1 and list(maps.shape[1:]) == record["heat_maps"]["grid_size"]  # the word maps' grid
    assert torch.isfinite(maps).all() and maps.sum() > 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary[0]["relations"]["image->image"]
    assert entry["plots"] == [str(out.absolute() / "relations" / "image_image.png")]
    assert "relations (relations/): image->image" in capsys.readouterr().out
    assert record["settings"]["relations"] == ["image->image"] and record["settings"]["query"] == [8.0, 40.0]


def test_image_relation_from_a_box_differs_from_a_far_point(sd_dir, tmp_path):
    box, far = tmp_path / "box", tmp_path / "far"
    assert _generate(sd_dir, box, "--relations", "image->image", "--query-box", "0,0,16,16") == 0
    assert _generate(sd_dir, far, "--relations", "image->image", "--query", "47,31") == 0
    doc, tensors = load_relation_arrays(box / "relations" / "image_image.json")
    assert doc["queries"][0]["box_yxyx"] == [0.0, 0.0, 16.0, 16.0]
    _, other = load_relation_arrays(far / "relations" / "image_image")
    assert not torch.allclose(tensors["maps"], other["maps"])  # the query decides the rows that are read


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--relations", "text->text"], "has no text->text relation"),
        (["--relations", "image->image", "--query", "48,0"], "lies outside the 32x48 image"),
        (["--relations", "image->image", "--query-box", "0,0,49,10"], "reaches outside the 32x48 image"),
        (["--relations", "image->image"], "needs a query"),
        (["--query", "1,1"], "add the image->image relation"),
        (["--relations", "image->image,", "--query", "1,1"], "--relations holds an empty kind"),
        (["--relations", "image->text", "--query", "1,1"], "unknown relation 'image->text'"),
        (["--relations", "image->image", "--query", "1"], "--query must be X,Y"),
        (["--relations", "image->image", "--query-box", "5,5,5,9"], "is empty"),
    ],
)
def test_bad_relation_options_exit_2_with_one_line_before_generating(sd_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert _generate(sd_dir, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())  # nothing written
