"""Input checks that run before anything heavy is imported or loaded (torch-free), so that bad
input fails in a second with one line naming the problem (`error: ...`, exit code 2)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from personalize.captions import image_captions
from personalize.errors import TrainerInputError
from personalize.families.detection import detect_folder_family
from personalize.spec import BaseModelSource, Concept, EarlyStopping, PersonalizationJob

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# A base model as one checkpoint file in the original layout (baseModel.path + baseModel.config)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Where PersonalizationJob volumes are mounted in the trainer pod: `<root>/<claimName>/<path>`.
VOLUMES_ROOT_ENV = "PJ_VOLUMES_ROOT"
DEFAULT_VOLUMES_ROOT = "/volumes"


def resolve_volume_path(path: str, claim_name: Optional[str]) -> Path:
    """A spec path: relative to the claim's mount point when `claimName` is set, else as given."""
    if claim_name:
        return Path(os.environ.get(VOLUMES_ROOT_ENV, DEFAULT_VOLUMES_ROOT)) / claim_name / path
    return Path(path)


def concept_folder(concept: Concept) -> Path:
    if concept.images.uri:  # downloaded once into the pod's cache
        from personalize.storage.images import fetch_concept_images

        return fetch_concept_images(concept.images.uri)
    return resolve_volume_path(concept.images.path or "", concept.images.claim_name)


def list_image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise TrainerInputError(f"concept image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise TrainerInputError(f"concept image folder {str(folder)!r} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainerInputError(
            f"concept image folder {str(folder)!r} has no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})"
        )
    return files


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (a truncated file fails here, not in the middle of training), upright:
    a phone photo stored sideways with an EXIF orientation tag is turned as a viewer shows it."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise TrainerInputError(f"image {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None


def check_reference_fits(n_images: int, early_stopping: EarlyStopping) -> None:
    n_slots = early_stopping.reference_batch_size * early_stopping.reference_sub_batches
    if n_slots > n_images:
        raise TrainerInputError(
            f"earlyStopping.referenceBatchSize x referenceSubBatches = {n_slots} reference examples, "
            f"but the concept has only {n_images} image(s)"
        )
    if early_stopping.holdout and n_images - n_slots < 1:
        raise TrainerInputError(
            f"earlyStopping.holdout: holding out {n_slots} reference image(s) leaves no training images "
            f"(the concept has {n_images}); add images, lower referenceBatchSize or set holdout: false"
        )


def is_single_file(path: Path) -> bool:
    """A base model given as one checkpoint file (loaded with the pipeline's `from_single_file`)."""
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


def base_model_config_folder(source: BaseModelSource) -> Path:
    """The folder of a single-file base model's configs (baseModel.config), checked."""
    checkpoint = resolve_volume_path(source.path or "", source.claim_name)
    if not source.config:
        raise TrainerInputError(
            f"baseModel.path {str(checkpoint)!r} is a single checkpoint file: set baseModel.config to a folder with "
            "the pipeline's config files (model_index.json, each component's config, scheduler and tokenizer), "
            "e.g. the base model's diffusers folder; nothing is downloaded")
    folder = resolve_volume_path(source.config, source.claim_name)
    if not (folder / "model_index.json").is_file():
        raise TrainerInputError(f"baseModel.config {str(folder)!r} is not a pipeline config folder (no model_index.json)")
    return folder


def check_base_model(source: BaseModelSource) -> None:
    if source.hub_id:  # resolved (downloaded once into the shared cache) and checked here
        from personalize.storage.hub import resolve_snapshot

        resolve_snapshot(source.hub_id, source.revision, source.allow_pickle_weights)
        return
    if not source.path:
        return  # builtin: checked when loading
    path = resolve_volume_path(source.path, source.claim_name)
    if not path.exists():
        raise TrainerInputError(f"baseModel.path {str(path)!r} does not exist")
    if is_single_file(path):
        if path.suffix.lower() == ".ckpt" and not source.allow_pickle_weights:
            raise TrainerInputError(
                f"baseModel.path {str(path)!r} is a pickled checkpoint (.ckpt), which loads only with "
                "baseModel.allowPickleWeights: true (unpickling can run code); or convert it to .safetensors")
        base_model_config_folder(source)
        return
    if source.config:
        raise TrainerInputError(f"baseModel.config is for a single checkpoint file, but baseModel.path "
                                f"{str(path)!r} is not a .safetensors or .ckpt file")
    if not (path / "model_index.json").is_file():
        raise TrainerInputError(
            f"baseModel.path {str(path)!r} is neither a diffusers pipeline folder (no model_index.json) nor a "
            "single checkpoint file (.safetensors, .ckpt)")


def prepare_output_dir(path: str | Path) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe file of its own: every process of a multi-process job checks the same folder at
        # once, and a shared probe name lets one process delete the file another is checking.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise TrainerInputError(f"output directory {str(path)!r} is not writable: {err.strerror or err}") from None
    return out


def preflight(job: PersonalizationJob, output: str | Path) -> Path:
    """All cheap checks, in the order a user would fix them; returns the output directory."""
    spec = job.spec
    if spec.early_stopping.criterion.value == "clip" and not (
        spec.early_stopping.clip.model_path or spec.base_model.builtin
    ):
        raise TrainerInputError("earlyStopping.clip.modelPath: criterion clip needs a CLIP model folder")
    out = prepare_output_dir(output)
    if spec.output.uri:  # denied credentials fail now, not after training
        from personalize.storage.uploads import OutputUpload

        OutputUpload.for_job(spec, out).check_writable()
    check_base_model(spec.base_model)
    if spec.base_model.path:  # the family and the method x family pair, before torch is imported
        folder = resolve_volume_path(spec.base_model.path, spec.base_model.claim_name)
        if is_single_file(folder):  # its family is its config folder's
            folder = base_model_config_folder(spec.base_model)
            detect_folder_family(folder, spec, f"baseModel.config {str(folder)!r}")
        else:
            detect_folder_family(folder, spec, f"baseModel.path {str(folder)!r}")
    files = list_image_files(concept_folder(spec.concept))
    for path in files:
        open_rgb(path)
    image_captions(files, spec.concept.caption_source)  # missing (captionSource sidecar), empty or unreadable
    check_reference_fits(len(files), spec.early_stopping)
    return out
