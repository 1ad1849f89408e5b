"""Caption files (`photo.png` + `photo.txt`): which images use them (concept.captionSource), how
the identifier gets into them, that training batches and the reference batch use each image's
own caption, and that a folder without caption files trains exactly as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from personalize.captions import fill_caption
from personalize.data import load_concept_examples
from personalize.errors import TrainerInputError
from personalize.spec import Concept

# three of the six concept images get a caption file (by position in the sorted folder)
CAPTIONS = {0: "a {class_noun} on grass, {token} style", 2: "red stripes on a white card", 4: "a sks triangle, close up"}


def concept(folder, **fields) -> Concept:
    return Concept.model_validate({"images": {"path": str(folder)}, "classNoun": "triangle", **fields})


@pytest.fixture
def captioned(concept_dir, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(concept_dir, folder)
    images = sorted(folder.iterdir())
    for index, text in CAPTIONS.items():
        images[index].with_suffix(".txt").write_text(text + "\nsecond line: ignored\n")
    return folder


def test_the_identifier_is_substituted_replaced_or_put_in_front():
    given = concept("x", token="sks")
    assert fill_caption("a {class_noun} on grass, {token} style", "sks", given) == "a triangle on grass, sks style"
    assert fill_caption("a sks triangle, close up", "sks", given) == "a sks triangle, close up"  # written already
    assert fill_caption("red stripes on a white card", "sks", given) == "sks, red stripes on a white card"
    # textualInversion with numVectors 2: the given token stands for its expansion
    assert fill_caption("a photo of <tri>", "<tri> <tri>_1", concept("x", token="<tri>")) == "a photo of <tri> <tri>_1"
    # an automatic identifier cannot be written in advance: {token}, or in front
    assert fill_caption("sks on a table", "lun", concept("x")) == "lun, sks on a table"


def test_auto_uses_caption_files_where_they_are_and_draws_as_before(captioned):
    """The same generator draws the same images with or without caption files; an image with one
    gets its caption, the others the templates as before."""
    own = load_concept_examples(concept(captioned, token="sks"), "sks", 16)
    plain = load_concept_examples(concept(captioned, token="sks", captionSource="template"), "sks", 16)
    assert plain.image_captions is None
    expected = {0: "a triangle on grass, sks style", 2: "sks, red stripes on a white card", 4: "a sks triangle, close up"}
    assert own.image_captions == [expected.get(i) for i in range(6)]
    g_own, g_plain = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(30):
        images, captions = own.sample(3, g_own)
        plain_images, plain_captions = plain.sample(3, g_plain)
        assert torch.equal(images, plain_images)
        for image, caption, plain_caption in zip(images, captions, plain_captions):
            index = next(i for i in range(6) if torch.equal(own.images[i], image))
            assert caption == expected.get(index, plain_caption)
            seen.add(index)
    assert seen == set(range(6))


def test_the_reference_batch_uses_each_images_own_caption(captioned, base_pipe, monkeypatch):
    import personalize.reference_batch as reference_batch
    from personalize.pipeline_io import models_of

    examples = load_concept_examples(concept(captioned, token="sks"), "sks", 32)
    encoded = []
    real = reference_batch.encode_captions
    monkeypatch.setattr(reference_batch, "encode_captions",
                        lambda models, encoder, captions, device: encoded.append(captions) or real(models, encoder, captions, device))
    reference = reference_batch.ReferenceBatch(examples, size=6, seed=0, models=models_of(base_pipe), text_encoder_trained=False)
    reference.deterministic_loss(base_pipe.unet, base_pipe.text_encoder)
    files = [examples.files[i] for i in reference.indices]
    by_file = {f: fill_caption(f.with_suffix(".txt").read_text().splitlines()[0], "sks", concept(captioned, token="sks"))
               for f in files if f.with_suffix(".txt").exists()}
    assert len(by_file) == 3
    for file, caption in zip(files, encoded[0]):
        assert caption == by_file.get(file, "a photo of sks triangle")


@pytest.mark.parametrize("setup, message", [
    (lambda images: images[1].with_suffix(".txt").unlink(), "has no caption file"),
    (lambda images: images[1].with_suffix(".txt").write_text("\n  \n"), "is empty"),
    (lambda images: images[1].with_suffix(".txt").write_bytes(b"\xff\xfe caption"), "is not UTF-8 text"),
])
def test_caption_file_problems_are_named(concept_dir, tmp_path, setup, message):
    folder = tmp_path / "images"
    shutil.copytree(concept_dir, folder)
    images = sorted(folder.iterdir())
    for image in images:
        image.with_suffix(".txt").write_text("a triangle")
    setup(images)
    with pytest.raises(TrainerInputError, match=message) as err:
        load_concept_examples(concept(folder, captionSource="sidecar"), "sks", 16)
    assert str(images[1].with_suffix(".txt").name) in str(err.value) and "\n" not in str(err.value)


def test_a_captioned_lora_job_runs_with_its_token_in_the_captions(captioned, tmp_path):
    """The given token written in the caption files is not refused as "a word of the captions"."""
    from personalize.pipeline_io import builtin_tiny_world_folder
    from personalize.run import main

    for image in sorted(captioned.glob("*.png")):
        image.with_suffix(".txt").write_text("a photo of sks on a table")
    spec = {"baseModel": {"path": str(builtin_tiny_world_folder())}, "method": "lora",
            "concept": {"images": {"path": str(captioned)}, "classNoun": "triangle", "token": "sks", "captionSource": "sidecar"},
            "training": {"maxSteps": 2, "batchSize": 2}, "earlyStopping": {"referenceBatchSize": 2, "window": 4},
            "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["identifier"] == "sks"
