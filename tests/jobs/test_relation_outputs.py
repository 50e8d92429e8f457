"""Relations through the generation job: records beside the word maps, written by write_outputs."""

from __future__ import annotations

import torch

from daamkit.io.relations import load_relation_arrays
from daamkit.jobs.generate import GenerateOptions, generate_with_methods, split_relations, write_outputs
from daamkit.relation import ImageRelationMap, TokenRelationMatrix


def test_text_relation_of_a_joint_transformer_is_written_with_its_words(sd3, tmp_path):
    opts = GenerateOptions(steps=2, height=32, width=32, guidance_scale=1.0, progress=False,
                           relations=["text->text", "image->image"], query_box=(0.0, 0.0, 16.0, 8.0))
    [(record, others)] = generate_with_methods(sd3, "a red dog", opts)
    methods, relations = split_relations(others)
    assert methods == {} and set(relations) == {"text->text", "image->image"}
    assert isinstance(relations["text->text"], TokenRelationMatrix)
    assert isinstance(relations["image->image"], ImageRelationMap)
    paths = write_outputs(record, tmp_path / "run", methods=methods, relations=relations)
    assert set(paths["relations"]) == {"text->text", "image->image"}
    doc, tensors = load_relation_arrays(tmp_path / "run" / "relations" / "text_text")
    assert doc["kind"] == "text->text" and doc["words"] == ["a", "red", "dog"]
    labels, words = relations["text->text"].words()
    assert labels == doc["words"] and torch.allclose(tensors["word_matrix"], words)
    assert tensors["matrix"].shape[0] == len(doc["tokens"]) == tensors["matrix"].shape[1]
    assert (tmp_path / "run" / "relations" / "text_text.png").is_file()
    assert (tmp_path / "run" / "relations" / "image_image.png").is_file()
    assert record.settings["relations"] == ["text->text", "image->image"]
    assert record.settings["query_box"] == [0.0, 0.0, 16.0, 8.0]


def test_runs_without_relations_keep_their_settings_and_outputs(sd3, tmp_path):
    opts = GenerateOptions(steps=1, height=32, width=32, guidance_scale=1.0, progress=False)
    [(record, others)] = generate_with_methods(sd3, "a dog", opts)
    assert others == {} and not {"relations", "query", "query_box"} & set(record.settings)
    assert "relations" not in write_outputs(record, tmp_path / "plain")
