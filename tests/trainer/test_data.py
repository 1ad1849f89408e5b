"""Loading concept images and filling caption templates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from personalize.data import Augment, examples_of, fill_template, load_concept_examples, load_image, load_images
from personalize.errors import TrainerInputError
from personalize.spec import TEXTUAL_INVERSION_TEMPLATES, Concept, parse_spec

from job_specs import job_spec


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


def halves(left: tuple, right: tuple, size: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), left)
    img.paste(right, (size // 2, 0, size, size))
    return img


def test_exif_orientation_is_applied(tmp_path):
    """A phone stores the sensor's pixels and an orientation tag: 6 = turn 90 degrees clockwise to view."""
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((255, 0, 0), (0, 0, 255)).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    halves((255, 0, 0), (0, 0, 255)).save(tmp_path / "plain.jpg", quality=100)
    upright = load_image(tmp_path / "phone.jpg", 8)  # [3, 8, 8]
    top, bottom = upright[:, :3].mean(dim=(1, 2)), upright[:, 5:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < -0.8  # the stored left half (red) is now on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8
    untagged = load_image(tmp_path / "plain.jpg", 8)
    assert untagged[0, :, :3].mean() > 0.8 and untagged[2, :, 5:].mean() > 0.8  # left red, right blue


def wide_concept(tmp_path, n: int = 3):
    """Images 3 times as wide as high: a random square crop has room to move, the center one none."""
    for i in range(n):
        img = Image.new("RGB", (48, 16))
        for x in range(48):
            for y in range(16):
                img.putpixel((x, y), (x * 5, 40 * i, 255 - x * 5))
        img.save(tmp_path / f"wide{i}.png")
    return Concept.model_validate({"images": {"path": str(tmp_path)}, "classNoun": "triangle"})


def test_augmentation_changes_training_batches_only(tmp_path):
    concept = wide_concept(tmp_path)
    plain = load_concept_examples(concept, "zq", 16)
    flipped = load_concept_examples(concept, "zq", 16, augment=Augment(flip=1.0))
    cropped = load_concept_examples(concept, "zq", 16, augment=Augment(random_crop=True))
    # The central squares (what the reference batch takes) are the same whatever the augmentation.
    assert torch.equal(plain.images, flipped.images) and torch.equal(plain.images, cropped.images)
    assert flipped.resized is None and cropped.resized is not None

    a, captions = plain.sample(3, torch.Generator().manual_seed(4))
    b, flipped_captions = flipped.sample(3, torch.Generator().manual_seed(4))
    assert torch.equal(b, a.flip(-1)) and captions == flipped_captions

    crops = torch.stack([cropped.sample(3, torch.Generator().manual_seed(seed))[0] for seed in range(8)])
    assert torch.equal(plain.images, torch.stack([r[:, :, 16:32] for r in cropped.resized]))  # [3, 16, 48] each
    assert len({round(float(c[:, 0, 0, 0].sum()), 4) for c in crops}) > 2  # the left edge moves
    assert crops.shape[-2:] == (16, 16)


def test_textual_inversion_defaults_to_its_template_set_and_flips(concept_dir, tiny_pipeline_dir):
    ti = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "textualInversion"))
    examples = examples_of(ti, "<lun>", 8)
    assert len(examples.captions) == len(TEXTUAL_INVERSION_TEMPLATES) >= 10
    assert all("<lun>" in c for c in examples.captions) and "a photo of <lun>" in examples.captions
    assert examples.augment == Augment(flip=0.5, random_crop=False)

    lora = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora"))
    assert examples_of(lora, "lun", 8).captions == ["a photo of lun triangle"]
    assert Augment.of(lora) == Augment(flip=0.0, random_crop=True)
    own = job_spec(tiny_pipeline_dir, concept_dir, "textualInversion")
    own["concept"]["captionTemplate"] = "a {token} toy"
    own["training"]["augmentation"] = {"flip": 0.0, "crop": "random"}
    own = parse_spec(own)
    assert own.caption_templates == ["a {token} toy"] and Augment.of(own) == Augment(flip=0.0, random_crop=True)
