"""The vision-tower probes (tinyworld/shape_probe.py, conv_clip_probe.py): their data and that
pretraining's CLIP objective trains the model it is handed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tinyworld"))

from personalize.world import shapes  # noqa: E402
from personalize.world.tiny_models import TinyConfig  # noqa: E402


def test_plain_renders_drop_the_distractors_and_keep_the_rest_random():
    from shape_probe import plain_labelled

    rng = np.random.default_rng(0)
    drawn = [plain_labelled(rng, 32)[1] for _ in range(40)]
    assert {(a.pattern, a.background) for a in drawn} == {("solid", "sand")}
    assert len({a.shape for a in drawn}) > 4 and len({a.colour for a in drawn}) > 4


def test_pool_labels_follow_the_chosen_attribute():
    from shape_probe import CLASSES, render_pool

    images, by_shape = render_pool(30, 32, seed=3, cache=None, attribute="shape")
    same_images, by_colour = render_pool(30, 32, seed=3, cache=None, attribute="colour")
    assert np.array_equal(images, same_images)
    rng = np.random.default_rng([3, 7])  # the pool's own stream: the same draws again
    expected = [shapes.sample_labelled(rng, 32)[1] for _ in range(30)]
    assert [CLASSES["shape"][i] for i in by_shape] == [a.shape for a in expected]
    assert [CLASSES["colour"][i] for i in by_colour] == [a.colour for a in expected]


def test_sine_cosine_positions_give_every_patch_its_own_code():
    from shape_probe import sincos_positions

    codes = sincos_positions(4, 96)
    assert codes.shape == (17, 96)
    assert torch.count_nonzero(codes[0]) == 0  # the class token
    distances = torch.cdist(codes[1:], codes[1:])
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.1


@pytest.mark.parametrize("probe", ["vit", "resnet"])
def test_probe_towers_give_one_logit_per_shape(probe):
    from shape_probe import ResNetProbe, ShapeProbe

    model = ShapeProbe(TinyConfig.test()) if probe == "vit" else ResNetProbe((8, 16))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(shapes.SHAPES))


def test_train_clip_trains_every_part_of_the_conv_clip_and_its_attribute_heads_matter(tmp_path):
    import dataclasses

    from pretrain import LossLog, WorldPool, train_clip

    from personalize.world.tiny_models import build_conv_clip, load_tokenizer

    cfg = dataclasses.replace(TinyConfig.test(), image_tower_widths=(8, 16))
    pool = WorldPool(16, cfg.image_size, seed=0)

    def trained_image_tower(attribute_weight: float) -> dict[str, torch.Tensor]:
        model = build_conv_clip(cfg, seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained, _, steps = train_clip(cfg, pool, load_tokenizer(), steps=2, batch=4, seed=0,
                                       log=LossLog(tmp_path / "log.csv"), swap_images=2, model=model,
                                       attribute_weight=attribute_weight)
        assert trained is model and steps == 2
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert any(n.startswith("image_tower.") for n in changed) and "image_projection.weight" in changed
        assert any(n.startswith("text_tower.text_model.") for n in changed)
        assert "text_tower.text_projection.weight" in changed
        return {n: p.detach().clone() for n, p in model.image_tower.named_parameters()}

    with_heads, without = trained_image_tower(1.0), trained_image_tower(0.0)
    assert any(not torch.equal(with_heads[n], without[n]) for n in with_heads)
