"""Relation maps on disk: ``<stem>.safetensors`` (the arrays) + ``<stem>.json`` (what they mean), each
written atomically as run records are (tensors first, JSON last, both by rename).

* ``image->image``: tensor ``maps`` (queries, gh, gw), the grid maps of :class:`~daamkit.relation.ImageRelationMap`;
  the JSON holds the image size, each query (a point or box in pixels, or a region's pixel count) and the meta.
* ``text->text``: tensors ``matrix`` (T, T) over the tokens and ``word_matrix`` (W, W) over the prompt's
  words (:meth:`~daamkit.relation.TokenRelationMatrix.words`); the JSON names the tokens and the words.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from daamkit.errors import DaamkitError
from daamkit.io.record import record_paths, write_pair
from daamkit.relation import ImageRelationMap, RelationQuery, TokenRelationMatrix

FORMAT_NAME = "daamkit-relation"
FORMAT_VERSION = 1


class RelationFileError(DaamkitError, ValueError):
    """A relation file pair is missing, damaged or not a relation."""


def _query_doc(q: RelationQuery) -> dict[str, Any]:
    if q.point is not None:
        return {"point_yx": [float(v) for v in q.point]}
    if q.box is not None:
        return {"box_yxyx": [float(v) for v in q.box]}
    assert q.mask is not None
    return {"mask_pixels": int(q.mask.sum()), "mask_shape": list(q.mask.shape)}


def save_relation(relation: ImageRelationMap | TokenRelationMatrix, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``relation`` as ``<stem>.safetensors`` + ``<stem>.json``; returns both paths."""
    st_path, json_path = record_paths(path)
    if isinstance(relation, ImageRelationMap):
        tensors = {"maps": relation.maps.detach().cpu().float().contiguous()}
        doc: dict[str, Any] = {
            "kind": "image->image",
            "image_size": list(relation.image_size),
            "queries": [_query_doc(q) | {"label": q.label()} for q in relation.queries],
        }
    elif isinstance(relation, TokenRelationMatrix):
        labels, words = relation.words()
        tensors = {"matrix": relation.matrix.detach().cpu().float().contiguous(),
                   "word_matrix": words.detach().cpu().float().contiguous()}
        doc = {"kind": "text->text", "tokens": list(relation.tokens), "words": labels,
               "alignment": relation.alignment.to_dict()}
    else:
        raise TypeError(f"not a relation: {type(relation).__name__}")
    data = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **doc, "meta": relation.meta,
           "tensors": {k: {"dtype": "float32", "shape": list(v.shape)} for k, v in tensors.items()},
           "safetensors_sha256": hashlib.sha256(data).hexdigest()}
    write_pair(st_path, json_path, data, doc)
    return st_path, json_path


def load_relation_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON document, tensors) of a relation written by :func:`save_relation`, the tensors checked
    against the JSON's checksum."""
    st_path, json_path = record_paths(path)
    try:
        data = st_path.read_bytes()
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RelationFileError(f"cannot read the relation {st_path.with_suffix('')}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise RelationFileError(f"{json_path} is not a daamkit relation file")
    if hashlib.sha256(data).hexdigest() != doc.get("safetensors_sha256"):
        raise RelationFileError(f"{st_path} does not match the checksum in {json_path.name}")
    return doc, st_load(data)
