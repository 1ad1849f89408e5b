"""The synthetic tiny world (PIL shapes), tiny model builders and CLIP scoring."""

from personalize.world.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_CONCEPTS,
    PATTERNS,
    SHAPES,
    Attributes,
    Concept,
    WorldSpec,
    caption_for,
    concept_by_name,
    render,
    sample_example,
    write_concept_images,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_CONCEPTS",
    "PATTERNS",
    "SHAPES",
    "Attributes",
    "Concept",
    "WorldSpec",
    "caption_for",
    "concept_by_name",
    "render",
    "sample_example",
    "write_concept_images",
]
