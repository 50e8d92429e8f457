"""Attribution methods: one class per method behind :class:`AttributionMethod` (see
:mod:`daamkit.methods.base` for the interface and how to add one). ``METHODS`` maps each method's
name to its class; ``tc.heat_maps(i, method=name)`` reads the maps of one of them."""

from __future__ import annotations

from daamkit.methods.base import CAPTURE_STREAMS, AttributionMethod
from daamkit.methods.concept import ConceptMethod
from daamkit.methods.daam import DaamMethod
from daamkit.methods.ovam import OvamEmbedding, OvamMethod, encode_positions, optimize_token
from daamkit.methods.refined import RefinedMethod
from daamkit.methods.relations import (
    RELATION_METHODS,
    ImageRelationMethod,
    RelationMethod,
    TextRelationMethod,
)

METHODS: dict[str, type[AttributionMethod]] = {cls.name: cls for cls in (DaamMethod, ConceptMethod, OvamMethod, RefinedMethod)}


def canonical_name(name: str) -> str | None:
    """The method a name or alias stands for (``"cross"`` -> ``"daam"``), or None if none does."""
    for cls in METHODS.values():
        if name == cls.name or name in cls.aliases:
            return cls.name
    return None


__all__ = [
    "CAPTURE_STREAMS",
    "METHODS",
    "AttributionMethod",
    "ConceptMethod",
    "DaamMethod",
    "ImageRelationMethod",
    "OvamEmbedding",
    "OvamMethod",
    "RELATION_METHODS",
    "RelationMethod",
    "TextRelationMethod",
    "RefinedMethod",
    "canonical_name",
    "encode_positions",
    "optimize_token",
]
