"""Loading concept images and filling caption templates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from personalize.data import fill_template, load_concept_examples, load_image, load_images
from personalize.errors import TrainerInputError
from personalize.spec import Concept


def test_images_are_square_at_the_resolution_and_in_minus_one_one(concept_dir):
    images, files = load_images(concept_dir, 16)
    assert images.shape == (6, 3, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.5 and images.max() > 0.5  # the full range is used, not [0, 1]
    assert [f.suffix for f in files] == [".png"] * 6


def test_wide_image_is_center_cropped(tmp_path):
    # Left third red, middle third green, right third blue: the center crop keeps green only.
    img = Image.new("RGB", (96, 32))
    for x in range(96):
        for y in range(32):
            img.putpixel((x, y), [(255, 0, 0), (0, 255, 0), (0, 0, 255)][x // 32])
    img.save(tmp_path / "wide.jpg", quality=100)
    pixels = load_image(tmp_path / "wide.jpg", 8)  # [3, 8, 8]
    mean_rgb = pixels.mean(dim=(1, 2))
    assert mean_rgb[1] > 0.8 and mean_rgb[0] < -0.8 and mean_rgb[2] < -0.8


def test_webp_and_uppercase_suffixes_are_read(tmp_path):
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "a.WEBP")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    images, files = load_images(tmp_path, 8)
    assert len(files) == 2 and images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no images"),
        (lambda d: (d.mkdir(), (d / "x.png").write_bytes(b"\x89PNG not really")), "cannot be read"),
    ],
    ids=["missing", "empty", "corrupt"],
)
def test_bad_image_folders_are_named(tmp_path, setup, message):
    folder = tmp_path / "imgs"
    setup(folder)
    with pytest.raises(TrainerInputError, match=message) as err:
        load_images(folder, 8)
    assert "\n" not in str(err.value)


def test_captions_substitute_identifier_and_class_noun(concept_dir):
    concept = Concept.model_validate(
        {
            "images": {"path": str(concept_dir)},
            "classNoun": "triangle",
            "captions": ["{token} on a table", "a {class_noun} like {token}"],
        }
    )
    examples = load_concept_examples(concept, "<lun>", 8)
    assert examples.captions == ["a photo of <lun> triangle", "<lun> on a table", "a triangle like <lun>"]
    assert fill_template("a photo of {token} {class_noun}", "zq", None) == "a photo of zq"


def test_batches_come_from_the_generator(concept_dir):
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}, "classNoun": "triangle"})
    examples = load_concept_examples(concept, "zq", 8)
    a, _ = examples.sample(3, torch.Generator().manual_seed(1))
    b, _ = examples.sample(3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
