"""The held-out concepts' dev/test/fresh split: disjoint, large enough, and out of every pretraining stage."""

import sys
from pathlib import Path

import numpy as np
import pytest

from personalize.world import shapes
from personalize.world.shapes import CONCEPT_SETS, DEV_CONCEPTS, FRESH_CONCEPTS, HELD_OUT_CONCEPTS, TEST_CONCEPTS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tinyworld"))


def _combination(concept):
    return (concept.shape, concept.colour, concept.pattern)


def test_the_sets_are_disjoint_and_together_are_every_held_out_concept():
    dev, test, fresh = ({_combination(c) for c in concepts} for concepts in (DEV_CONCEPTS, TEST_CONCEPTS, FRESH_CONCEPTS))
    assert not dev & test and not dev & fresh and not test & fresh
    assert dev | test | fresh == {_combination(c) for c in HELD_OUT_CONCEPTS}
    assert len(DEV_CONCEPTS) + len(TEST_CONCEPTS) >= 24 and len(FRESH_CONCEPTS) >= 12
    assert len({c.name for c in HELD_OUT_CONCEPTS}) == len(HELD_OUT_CONCEPTS)


def test_the_demo_concept_is_a_dev_concept():
    assert shapes.concept_by_name("red_striped_triangle") in DEV_CONCEPTS


def test_the_test_set_covers_every_shape_and_colour():
    assert {c.shape for c in TEST_CONCEPTS} == set(shapes.SHAPES)
    assert {c.colour for c in TEST_CONCEPTS} == set(shapes.COLOURS)


def test_each_shape_and_colour_pair_is_held_out_at_most_once():
    pairs = [(c.shape, c.colour) for c in HELD_OUT_CONCEPTS]
    assert len(pairs) == len(set(pairs))


def test_pretraining_still_shows_every_shape_in_every_colour():
    seen = {(s, c) for s, c, _ in shapes.DEFAULT_WORLD.pretraining_combinations()}
    assert seen == {(s, c) for s in shapes.SHAPES for c in shapes.COLOURS}


def test_the_pretraining_pool_never_renders_a_held_out_concept():
    from pretrain import WorldPool  # the pool every pretraining stage (CLIP, VAE, UNet) draws from

    pool = WorldPool(1500, 32, seed=0)
    seen = {(a.shape, a.colour, a.pattern) for a in pool.attributes}
    assert not seen & {_combination(c) for c in DEV_CONCEPTS}
    assert not seen & {_combination(c) for c in TEST_CONCEPTS}
    assert not seen & {_combination(c) for c in FRESH_CONCEPTS}
    # Sanity: a pool that large does reach most of the allowed combinations.
    assert len(seen) > 0.9 * len(shapes.DEFAULT_WORLD.pretraining_combinations())


def test_concept_set_by_name():
    assert shapes.concept_set("dev") == DEV_CONCEPTS
    assert shapes.concept_set("test") == TEST_CONCEPTS
    assert shapes.concept_set("all") == HELD_OUT_CONCEPTS
    assert shapes.concept_set("fresh") == FRESH_CONCEPTS
    assert set(CONCEPT_SETS) == {"dev", "test", "fresh"}
    with pytest.raises(KeyError, match="no concept set named"):
        shapes.concept_set("train")


def test_existing_concepts_keep_their_photos():
    """Photos are seeded by a concept's index; the dev concepts must keep their original indices."""
    assert HELD_OUT_CONCEPTS[: len(DEV_CONCEPTS) + len(TEST_CONCEPTS)] == DEV_CONCEPTS + TEST_CONCEPTS
    assert HELD_OUT_CONCEPTS[0].name == "red_striped_triangle"


def test_swap_captions_differ_only_in_the_swapped_attribute():
    from pretrain import swap_captions

    attrs = shapes.Attributes("star", "red", "dotted", "grass")
    rng = np.random.default_rng(0)
    for attribute, values in (("shape", shapes.SHAPES), ("pattern", shapes.PATTERNS)):
        for _ in range(20):
            captions = swap_captions(attrs, attribute, values, rng)
            assert len(set(captions)) == len(values)
            for value, caption in zip(values, captions):
                assert value in caption.split()
                own = getattr(attrs, attribute)
                assert caption.replace(value, own, 1) == captions[values.index(own)]


def test_a_world_records_the_concepts_it_never_saw(tmp_path):
    from personalize.world import provenance

    provenance.write_record(tmp_path)
    assert provenance.held_out_by(tmp_path) == {c.name for c in HELD_OUT_CONCEPTS}


def test_a_world_without_a_record_held_out_only_the_dev_concepts(tmp_path):
    from personalize.world import provenance

    held_out = provenance.held_out_by(tmp_path)
    assert held_out == {c.name for c in DEV_CONCEPTS}
    assert not held_out & {c.name for c in TEST_CONCEPTS}


def test_the_installed_world_did_not_hold_out_the_fresh_concepts():
    """The fresh set came after the installed world was pretrained: its record must not claim it."""
    from personalize.world.provenance import held_out_by
    from personalize.world.tiny_models import TINY_WORLD_DIR

    held_out = held_out_by(TINY_WORLD_DIR)
    assert {c.name for c in DEV_CONCEPTS + TEST_CONCEPTS} <= held_out
    assert not held_out & {c.name for c in FRESH_CONCEPTS}


def test_the_third_world_held_out_every_set():
    """tinyworld/third_world, pretrained for the fresh set, never saw any held-out concept."""
    from personalize.world.provenance import held_out_by

    third = Path(__file__).resolve().parents[2] / "tinyworld" / "third_world"
    assert held_out_by(third) == {c.name for c in HELD_OUT_CONCEPTS}


def test_world_fingerprint_follows_the_weights_bytes(tmp_path):
    from personalize.world.provenance import world_fingerprint

    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "model.safetensors"
    weights.write_bytes(b"one")
    first = world_fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("not weights")
    assert world_fingerprint(tmp_path) == first
    weights.write_bytes(b"two")
    assert world_fingerprint(tmp_path) != first
