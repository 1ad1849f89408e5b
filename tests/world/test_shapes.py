"""The synthetic world: deterministic from a seed, held-out concepts never in pretraining."""

import numpy as np
import pytest
from PIL import Image

from personalize.world import shapes
from personalize.world.shapes import HELD_OUT_CONCEPTS, HELD_OUT_COMBINATIONS


def _examples(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [shapes.sample_example(rng) for _ in range(n)]


def test_same_seed_gives_identical_images_and_captions():
    first, second = _examples(7, 20), _examples(7, 20)
    assert [c for _, c in first] == [c for _, c in second]
    for (a, _), (b, _) in zip(first, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_different_seeds_give_different_examples():
    first, second = _examples(1, 10), _examples(2, 10)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, second))


def test_pretraining_samples_never_use_a_held_out_combination():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(5000):
        attrs = shapes.sample_attributes(rng)
        seen.add((attrs.shape, attrs.colour, attrs.pattern))
    assert not seen & HELD_OUT_COMBINATIONS
    # The sampler does cover the rest of the world (so the check above is not vacuous).
    assert len(seen) == len(shapes.DEFAULT_WORLD.pretraining_combinations())


def test_pretraining_captions_never_describe_a_held_out_concept():
    rng = np.random.default_rng(3)
    for _ in range(3000):
        caption = shapes.caption_for(shapes.sample_attributes(rng), rng)
        for concept in HELD_OUT_CONCEPTS:
            words = caption.split()
            assert not {concept.shape, concept.colour, concept.pattern} <= set(words), caption


def test_there_are_at_least_eight_distinct_held_out_concepts():
    assert len(HELD_OUT_CONCEPTS) >= 8
    assert len({c.name for c in HELD_OUT_CONCEPTS}) == len(HELD_OUT_CONCEPTS)
    assert len(HELD_OUT_COMBINATIONS) == len(HELD_OUT_CONCEPTS)
    for concept in HELD_OUT_CONCEPTS:
        assert concept.class_noun == concept.shape in shapes.SHAPES
        assert concept.colour in shapes.COLOURS and concept.pattern in shapes.PATTERNS


def test_render_draws_the_shape_in_its_colour():
    attrs = shapes.Attributes("square", "red", "solid", "snow", 0.5, 0.5, 0.35, 0.0)
    pixels = np.asarray(shapes.render(attrs, np.random.default_rng(0), size=32)).astype(int)
    assert tuple(pixels[16, 16]) == shapes.COLOURS["red"]
    assert pixels[1, 1].min() > 180  # snow around it


def test_patterns_differ_inside_the_shape():
    def centre(pattern):
        attrs = shapes.Attributes("square", "blue", pattern, "sand", 0.5, 0.5, 0.38, 0.0)
        return np.asarray(shapes.render(attrs, np.random.default_rng(0), size=32))[10:22, 10:22]

    solid, striped = centre("solid"), centre("striped")
    assert solid.std(axis=(0, 1)).max() < 1.0
    assert striped.std(axis=(0, 1)).max() > 20.0


def test_write_concept_images_is_deterministic(tmp_path):
    concept = HELD_OUT_CONCEPTS[0]
    paths_a = shapes.write_concept_images(concept, 4, tmp_path / "a", seed=5)
    paths_b = shapes.write_concept_images(concept, 4, tmp_path / "b", seed=5)
    assert len(paths_a) == 4 and all(p.suffix == ".png" for p in paths_a)
    for a, b in zip(paths_a, paths_b):
        image = Image.open(a)
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(b)))


def test_concept_by_name_rejects_unknown_names():
    assert shapes.concept_by_name(HELD_OUT_CONCEPTS[1].name) == HELD_OUT_CONCEPTS[1]
    with pytest.raises(KeyError):
        shapes.concept_by_name("no_such_concept")
