"""The PersonalizationJob API: one pydantic model that the operator validates, the trainer reads
and `crds/` is generated from (see `pj_operator.crdgen`).

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
Unknown fields are rejected everywhere so that a typo never silently becomes a default.

This module must stay torch-free: the operator image imports it.
"""

from __future__ import annotations

import json
import math
import re
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "personalization.dvar.dev"
API_VERSION = "v1alpha1"
KIND = "PersonalizationJob"
PLURAL = "personalizationjobs"
SINGULAR = "personalizationjob"
SHORT_NAME = "pj"

# The training caption of every method but Textual Inversion, which draws from the set below.
DEFAULT_CAPTION_TEMPLATE = "a photo of {token} {class_noun}"

# Textual Inversion's default captions: many plain photo-style descriptions of the token alone, in
# the spirit of the ImageNet-style prompt list that the original method and diffusers' script use,
# so that the embedding learns the concept rather than one sentence around it.
TEXTUAL_INVERSION_TEMPLATES = (
    "a photo of {token}",
    "a picture of {token}",
    "an image showing {token}",
    "a snapshot of the {token}",
    "a well-lit photo of {token}",
    "a dim photo of {token}",
    "a blurry picture of the {token}",
    "a sharp picture of {token}",
    "a zoomed-in photo of {token}",
    "a photo of {token} seen from a distance",
    "a cropped picture of {token}",
    "a plain photo of {token}",
    "a simple picture of the {token}",
    "a photograph of a single {token}",
    "{token}, photographed",
    "a small picture of {token}",
    "a large picture of {token}",
    "a render of the {token}",
)

# Object-store and hub schemes the trainer knows how to read. Anything else is rejected.
ALLOWED_URI_SCHEMES = ("s3", "gs", "https")


class Method(str, Enum):
    textual_inversion = "textualInversion"
    dreambooth = "dreambooth"
    lora = "lora"
    custom_diffusion = "customDiffusion"
    ti_dreambooth = "tiDreambooth"


class CriterionName(str, Enum):
    dvar = "dvar"
    ema = "ema"
    hall = "hall"
    trend = "trend"
    clip = "clip"
    none = "none"


class LrScheduler(str, Enum):
    """diffusers.optimization.get_scheduler's schedules (the training scripts' --lr_scheduler)."""

    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Crop(str, Enum):
    center = "center"
    random = "random"


class CaptionSource(str, Enum):
    """Where an image's training caption comes from (docs/data.md, "Captions")."""

    auto = "auto"  # its sidecar .txt file when it has one, else the templates
    sidecar = "sidecar"  # every image must have its .txt file
    template = "template"  # the templates only; .txt files are ignored


class ArtifactFormat(str, Enum):
    diffusers = "diffusers"  # what the family's stock diffusers loaders read
    kohya = "kohya"  # LoRA only: kohya-ss sd-scripts' layout (A1111, Forge, ComfyUI)


class EvalSchedule(str, Enum):
    """When the deterministic loss is evaluated (see docs/criteria.md)."""

    fixed = "fixed"
    adaptive = "adaptive"


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class StopReason(str, Enum):
    convergence_threshold = "ConvergenceThreshold"
    max_steps = "MaxSteps"
    cancelled = "Cancelled"
    failed = "Failed"


class Packing(str, Enum):
    """Whether the operator may train the job in one pod with compatible jobs (docs/operator.md)."""

    auto = "auto"
    never = "never"


class Tracker(str, Enum):
    """Experiment trackers, reached through accelerate's tracker API (each needs its extra)."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


class Phase(str, Enum):
    pending = "Pending"
    queued = "Queued"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class ApiModel(BaseModel):
    """Base of every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )

    def to_api(self) -> dict[str, Any]:
        """The wire form: camelCase keys, enums as strings, unset optionals dropped, and every
        number finite or null (NaN and Infinity are not JSON: an API server refuses them)."""
        return finite_or_null(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float, however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Per-method defaults. Published settings (the DVAR paper, arXiv 2302.04841) are for
# Stable Diffusion 1.5 with evaluation every step; step budgets follow the original methods.
# --------------------------------------------------------------------------------------------


class MethodDefaults(BaseModel):
    max_steps: int
    learning_rate: float
    window: int
    threshold: float
    prior_preservation: bool
    # Augmentation as the diffusers training script of the method does it by default: Textual
    # Inversion flips half of the images (flip_p=0.5) and crops the center; DreamBooth, LoRA and
    # Custom Diffusion take a random square crop and do not flip.
    flip_probability: float = 0.0
    crop: Crop = Crop.random


METHOD_DEFAULTS: dict[Method, MethodDefaults] = {
    Method.textual_inversion: MethodDefaults(
        max_steps=6100, learning_rate=5e-3, window=310, threshold=0.15, prior_preservation=False,
        flip_probability=0.5, crop=Crop.center,
    ),
    Method.dreambooth: MethodDefaults(
        max_steps=1000, learning_rate=5e-6, window=440, threshold=0.4, prior_preservation=True
    ),
    # LoRA has no published DVAR setting: it borrows Textual Inversion's window and threshold
    # (310 steps, 0.15) as an SD 1.5 starting point. They were not tuned, on the tiny world or
    # elsewhere; `replay` tunes them on recorded runs (docs/criteria.md).
    Method.lora: MethodDefaults(
        max_steps=1000, learning_rate=1e-4, window=310, threshold=0.15, prior_preservation=False
    ),
    Method.custom_diffusion: MethodDefaults(
        max_steps=500, learning_rate=1e-5, window=180, threshold=0.15, prior_preservation=False
    ),
    # TI-then-DreamBooth: stage 2 fine-tunes the UNet like DreamBooth, without prior preservation.
    Method.ti_dreambooth: MethodDefaults(
        max_steps=1000, learning_rate=2e-6, window=440, threshold=0.4, prior_preservation=False
    ),
}

# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


def _check_uri(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest:
        raise ValueError("not a URI (expected scheme://...)")
    if scheme not in ALLOWED_URI_SCHEMES:
        raise ValueError(f"URI scheme {scheme!r} is not allowed; use one of {', '.join(ALLOWED_URI_SCHEMES)}")
    # Credentials belong in a Secret (secretRef), never in the spec: a URI with user:password@ or
    # a query string (pre-signed URLs carry signatures there) would be copied into conditions,
    # events and logs. The message does not repeat the URI for the same reason.
    if "@" in rest.split("/", 1)[0] or "?" in rest or "#" in rest:
        raise ValueError("URI must not contain credentials, a query string or a fragment; "
                         "reference a Secret with secretRef instead")
    return uri


class SecretRef(ApiModel):
    """A Secret in the job's namespace whose keys become the trainer's environment variables
    (`envFrom`), e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or HF_TOKEN."""

    name: str = Field(min_length=1, max_length=253, description="Name of a Secret in the same namespace.")


def _check_relative_path(path: str) -> str:
    """A path inside a mounted volume: relative, and no '..' that would escape the volume."""
    p = PurePosixPath(path)
    if p.is_absolute():
        raise ValueError(f"{path!r} must be relative to the volume when claimName is set")
    if ".." in p.parts:
        raise ValueError(f"{path!r} must not contain '..'")
    return path


class BaseModelSource(ApiModel):
    """Where the pretrained pipeline comes from: exactly one of path, hubId, builtin."""

    path: Optional[str] = Field(
        None,
        description="Folder of a diffusers pipeline (on a mounted volume). Its family, from model_index.json: "
        "Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX.1 (docs/trainer.md: which methods run on which). Or one "
        "checkpoint file in the original layout (.safetensors; .ckpt with allowPickleWeights), with `config`.",
    )
    config: Optional[str] = Field(
        None,
        description="For a single-file path: a folder with the pipeline's config files (model_index.json, each "
        "component's config, the scheduler and the tokenizer; no weights needed), e.g. the base model's diffusers "
        "folder. On the same volume as path (relative when claimName is set). Nothing is downloaded.",
    )
    claim_name: Optional[str] = Field(
        None, description="PVC holding `path` (then `path` is relative to the volume root)."
    )
    hub_id: Optional[str] = Field(
        None, description="Hugging Face hub id, for clusters with hub access (cached in the shared HF_HOME)."
    )
    revision: Optional[str] = Field(None, description="Branch, tag or commit of hubId to pin (default: main).")
    allow_pickle_weights: bool = Field(
        False,
        description="Also load pickled weights: .bin files from hubId, a .ckpt path. Off: safetensors only, since "
        "unpickling can run code.",
    )
    builtin: Optional[Literal["tiny-world"]] = Field(
        None, description="A model shipped with the trainer: the tiny world (CPU demo and tests)."
    )
    secret_ref: Optional[SecretRef] = Field(None, description="Credentials for hubId (e.g. HF_TOKEN).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "BaseModelSource":
        given = [n for n in ("path", "hub_id", "builtin") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("set exactly one of path, hubId, builtin")
        if self.revision and not self.hub_id:
            raise ValueError("revision applies to hubId only")
        if self.allow_pickle_weights and not (self.hub_id or self.path):
            raise ValueError("allowPickleWeights applies to hubId and path only")
        if self.config and not self.path:
            raise ValueError("config applies to a single-file path only")
        if self.claim_name and self.path:
            _check_relative_path(self.path)
            if self.config:
                _check_relative_path(self.config)
        return self


class ImageSource(ApiModel):
    """The concept's photos: a folder (optionally on a PVC) or an object-store URI."""

    path: Optional[str] = Field(None, description="Folder of images.")
    claim_name: Optional[str] = Field(
        None, description="PVC holding `path` (then `path` is relative to the volume root)."
    )
    uri: Optional[str] = Field(
        None,
        description="s3://bucket/prefix/ or gs://bucket/prefix/ (every image object under it), or an https:// "
        "archive (.zip, .tar.gz) or manifest (.txt, one image URL per line).",
    )
    secret_ref: Optional[SecretRef] = Field(None, description="Credentials for uri.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if bool(self.path) == bool(self.uri):
            raise ValueError("set exactly one of path, uri")
        if self.uri:
            _check_uri(self.uri)
        if self.claim_name and self.path:
            _check_relative_path(self.path)
        return self


class Concept(ApiModel):
    images: ImageSource
    class_noun: Optional[str] = Field(
        None, min_length=1, description="What the concept is ('dog'); needed for prior preservation."
    )
    token: str = Field(
        "auto",
        min_length=1,
        description="The concept's identifier: 'auto' picks rare tokens of the vocabulary; dreambooth and lora "
        "take an existing rare token (e.g. 'sks'), the methods that train an embedding a new word.",
    )
    initializer_token: Optional[str] = Field(
        None, description="Word whose embedding initialises the new token (default: the class noun)."
    )
    num_identifier_tokens: int = Field(1, ge=1, le=8, description="How many rare tokens 'auto' picks.")
    caption_template: Optional[str] = Field(
        None,
        description="Training caption; {token} and {class_noun} are substituted. Default: textualInversion "
        "draws from a built-in set of photo-style templates, the other methods use "
        "'a photo of {token} {class_noun}'.",
    )
    captions: list[str] = Field(
        default_factory=list, description="Extra caption templates; one is drawn per example."
    )
    caption_source: CaptionSource = Field(
        CaptionSource.auto,
        description="auto: an image with a caption file beside it (photo.png + photo.txt) trains on that caption, "
        "the others on the templates; sidecar: every image needs its .txt; template: .txt files are ignored. "
        "A caption's {token} and {class_noun} are substituted; one without {token} gets the identifier in front.",
    )

    @model_validator(mode="after")
    def _token_shape(self) -> "Concept":
        if self.token != "auto" and any(c.isspace() for c in self.token):
            raise ValueError("token must not contain whitespace")
        if self.caption_template is not None and "{token}" not in self.caption_template:
            raise ValueError("captionTemplate must contain {token}")
        return self


class PriorPreservation(ApiModel):
    enabled: Optional[bool] = Field(None, description="Default: on for dreambooth, off otherwise.")
    class_prompt: Optional[str] = Field(None, description="Default: 'a photo of a {classNoun}'.")
    num_class_images: int = Field(100, ge=1, le=10000)
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0)
    inference_steps: int = Field(25, ge=1, le=1000, description="Sampling steps for class images.")


class Augmentation(ApiModel):
    """Random changes to the training images (never to the reference batch, which stays fixed)."""

    flip: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="Probability of a horizontal flip. Default: 0.5 for textualInversion, else 0."
    )
    crop: Optional[Crop] = Field(
        None, description="Square crop of the resized image: center or random. Default: center for "
        "textualInversion, random otherwise (as the diffusers scripts)."
    )


class Training(ApiModel):
    max_steps: Optional[int] = Field(None, ge=1, le=1_000_000, description="Default: per method.")
    min_steps: int = Field(0, ge=0, le=1_000_000, description="No criterion may stop before this.")
    learning_rate: Optional[float] = Field(None, gt=0.0, le=1.0, description="Default: per method.")
    batch_size: int = Field(1, ge=1, le=1024, description=(
        "Examples per process per micro-batch; the global batch of one optimizer step is "
        "batchSize x gradientAccumulationSteps x processes (resources.gpus when > 1)."))
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    resolution: Optional[int] = Field(None, ge=8, le=4096, description="Default: the model's sample size.")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (UNet, and the text encoder when it trains)."
    )
    max_grad_norm: float = Field(
        1.0, ge=0.0, le=1e6, description="Clip the gradient's norm to this before each optimizer step (0: off)."
    )
    lr_scheduler: LrScheduler = Field(
        LrScheduler.constant, description="Learning-rate schedule over the stage's maxSteps (diffusers' get_scheduler)."
    )
    lr_warmup_steps: int = Field(
        0, ge=0, le=1_000_000, description="Steps of linear warmup; needs a schedule with warmup (not constant)."
    )
    augmentation: Augmentation = Field(default_factory=Augmentation)
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: off).")
    offload_text_encoders: bool = Field(
        False,
        description="Move frozen text encoders to the CPU once the training captions are encoded (e.g. T5-XXL, 9 GB).",
    )

    @model_validator(mode="after")
    def _warmup_needs_a_schedule(self) -> "Training":
        if self.lr_warmup_steps and self.lr_scheduler == LrScheduler.constant:
            raise ValueError("lrWarmupSteps: the constant schedule has no warmup; "
                             "use lrScheduler: constant_with_warmup (or another schedule)")
        return self


class TextualInversionOptions(ApiModel):
    num_vectors: int = Field(1, ge=1, le=16, description="Embedding rows learned per identifier token.")


class DreamboothOptions(ApiModel):
    train_text_encoder: bool = False


class LoraOptions(ApiModel):
    rank: int = Field(4, ge=1, le=256)
    alpha: Optional[float] = Field(None, gt=0.0, description="Default: equal to rank.")
    target_modules: Optional[list[str]] = Field(
        None,
        description="Module name suffixes that get adapters. Default: the model family's (SD, SDXL: "
        "to_q, to_k, to_v, to_out.0; SD3, FLUX.1: those of diffusers' train_dreambooth_lora_sd3/flux.py).",
    )
    train_text_encoder: bool = Field(
        False,
        description="Also train LoRA adapters on the CLIP text encoder(s) (q, k, v and out projections; SDXL: "
        "both encoders), as diffusers' train_dreambooth_lora(_sdxl).py --train_text_encoder. "
        "SD 1.x/2.x and SDXL only.",
    )


class WeightingScheme(str, Enum):
    none = "none"
    logit_normal = "logit_normal"
    mode = "mode"
    sigma_sqrt = "sigma_sqrt"
    cosmap = "cosmap"


class FlowMatchingOptions(ApiModel):
    """Options of the flow-matching families (SD3, FLUX.1), as in diffusers' LoRA scripts."""

    weighting_scheme: WeightingScheme = Field(
        WeightingScheme.none,
        description="Timestep density (logit_normal, mode; none: uniform) or loss weighting (sigma_sqrt, cosmap).",
    )
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0)
    logit_std: float = Field(1.0, gt=0.0, le=10.0)
    mode_scale: float = Field(1.29, ge=0.0, le=10.0)
    guidance_scale: float = Field(3.5, ge=0.0, le=100.0, description="FLUX.1-dev's guidance input (fixed).")
    precondition_outputs: bool = Field(True, description="SD3: predict x_0 from the velocity (the script's default).")
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 tokens per prompt (capped by the tokenizer).")


class TiDreamboothOptions(ApiModel):
    stage1_max_steps: int = Field(3000, ge=1, le=1_000_000, description="Textual Inversion budget.")
    stage1_learning_rate: float = Field(5e-3, gt=0.0, le=1.0)
    stage1_window: int = Field(310, ge=2)
    stage1_threshold: float = Field(0.15, gt=0.0)


class FixedComponents(ApiModel):
    """Which parts of the reference batch stay fixed (True) or are re-sampled per evaluation."""

    images: bool = True
    latents: bool = True
    noise: bool = True
    captions: bool = True
    timesteps: bool = True

    def code(self) -> str:
        """The paper's 5-bit code, images/latents/noise/captions/timesteps ('11111' = deterministic)."""
        return "".join("1" if v else "0" for v in (self.images, self.latents, self.noise, self.captions, self.timesteps))


class ClipCriterion(ApiModel):
    model_path: Optional[str] = Field(None, description="CLIP model folder (builtin tiny world if unset there).")
    every_steps: int = Field(100, ge=1)
    patience: int = Field(3, ge=1)
    epsilon: float = Field(0.0, ge=0.0)
    num_samples: int = Field(4, ge=1, le=64)
    inference_steps: int = Field(25, ge=1, le=1000)


class EarlyStopping(ApiModel):
    criterion: CriterionName = CriterionName.dvar
    window: Optional[int] = Field(
        None,
        ge=2,
        le=1_000_000,
        description="Window in training steps (not evaluations): the criterion looks at the values of "
        "the last `window` steps, i.e. ceil(window / evalEvery) evaluations. Default: per method.",
    )
    threshold: Optional[float] = Field(None, gt=0.0, le=1e6, description="Default: per criterion/method.")
    # 4, not 1: the cheapest schedule whose stops keep as much of the gain as evaluating every step
    # (median concept within 2 points on the dev, test and fresh baselines; docs/criteria.md)
    eval_every: int = Field(
        4, ge=1, le=100_000, description="Evaluate the deterministic loss every N steps (evalSchedule fixed)."
    )
    eval_schedule: EvalSchedule = Field(
        EvalSchedule.fixed,
        description="fixed: every evalEvery steps. adaptive: gaps that halve while the loss strays from a straight "
        "line and double while it follows one (up to maxEvalGap), every step once the convergence value is near "
        "the threshold, and at once when the criterion would stop on the last measurement; the criterion then "
        "sees one value per training step, interpolated linearly between evaluations.",
    )
    max_eval_gap: Optional[int] = Field(
        None, ge=1, le=100_000, description="Adaptive schedule: the most steps between two evaluations. "
        "Default: the window / 4.",
    )
    reference_batch_size: int = Field(4, ge=1, le=256)
    reference_sub_batches: int = Field(
        1, ge=1, le=64, description="Accumulate this many reference batches per evaluation."
    )
    fixed: FixedComponents = Field(default_factory=FixedComponents)
    holdout: bool = Field(False, description="Exclude the reference examples from the training set.")
    clip: ClipCriterion = Field(default_factory=ClipCriterion)

    @property
    def criterion_spacing(self) -> int:
        """Training steps per value the criterion consumes: evalEvery, or 1 for the adaptive
        schedule (which feeds one value per step)."""
        return 1 if self.eval_schedule == EvalSchedule.adaptive else self.eval_every


class Validation(ApiModel):
    prompts: list[str] = Field(
        default_factory=lambda: ["a photo of {token} {class_noun}"],
        description="Prompts for the final sample grid; {token} and {class_noun} are substituted.",
    )
    num_images_per_prompt: int = Field(2, ge=1, le=64)
    inference_steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0)
    every_steps: int = Field(
        0, ge=0, le=1_000_000, description="Also draw the grid while training: samples/step-NNNNN.png every N "
        "steps and at the stop (0: only samples_before.png and samples.png). Its cost is reported like tracking's.",
    )


class Reporting(ApiModel):
    """Where progress goes besides the status, the metrics and the output folder."""

    trackers: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers that get the losses, L_det per timestep, the "
        "training statistics, the convergence value, the stop decision and the sample grids (accelerate's "
        "trackers; install the trainer's extra of each). Their files go under <output>/trackers/.",
    )
    project: Optional[str] = Field(
        None, min_length=1, max_length=128, description="Tracker project (W&B) or experiment (MLflow). "
        "Default: personalization.",
    )
    log_every_steps: int = Field(
        100, ge=1, le=1_000_000, description="A progress line in the log every N steps, or every logEverySeconds, "
        "whichever comes first (and always at the first and the last step). A terminal gets a live bar instead.",
    )
    log_every_seconds: float = Field(30.0, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _distinct(self) -> "Reporting":
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError("trackers: each tracker at most once")
        return self


class Output(ApiModel):
    path: str = Field("output", description="Folder for artifacts (on a mounted volume in a cluster).")
    claim_name: Optional[str] = Field(
        None, description="PVC holding `path` (then `path` is relative to the volume root)."
    )
    uri: Optional[str] = Field(
        None,
        description="Optional object-store prefix (s3:// or gs://) the artifacts are uploaded to, result.json "
        "last; checkpoints are mirrored there too.",
    )
    secret_ref: Optional[SecretRef] = Field(None, description="Credentials for uri.")
    name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Names the artifact files: a LoRA becomes <name>.safetensors, every other artifact "
        "<name>_<its usual name> (docs/trainer.md, \"Artifact names\"). Default: the usual names.",
    )
    formats: list[ArtifactFormat] = Field(
        default_factory=lambda: [ArtifactFormat.diffusers], min_length=1,
        description="Artifact formats: diffusers, and for lora on SD 1.x/2.x and SDXL also kohya "
        "(<lora name>_kohya.safetensors with sd-scripts' ss_* metadata).",
    )
    snapshot_every: int = Field(
        0, ge=0, le=1_000_000,
        description="Also keep loadable artifacts every N steps, the step in their names "
        "(e.g. pytorch_lora_weights-step00100.safetensors); kept and uploaded with the rest (0: off).",
    )

    @model_validator(mode="after")
    def _check(self) -> "Output":
        if self.name and self.name.lower().endswith((".safetensors", ".ckpt", ".bin")):
            raise ValueError("name is a file stem: leave out the suffix (e.g. name: mydog gives mydog.safetensors)")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats: each format at most once")
        if self.uri:

            _check_uri(self.uri)
            if self.uri.startswith("https://"):
                raise ValueError("uri: https:// is read-only; upload to s3:// or gs://")
        if self.claim_name:
            _check_relative_path(self.path)
        return self


class Toleration(ApiModel):
    key: Optional[str] = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    toleration_seconds: Optional[int] = Field(None, ge=0)


class Resources(ApiModel):
    gpus: int = Field(1, ge=0, le=16, description=(
        "nvidia.com/gpu per job; >1 runs one data-parallel process per GPU (global batch: "
        "batchSize x gradientAccumulationSteps x gpus)."))
    # Unset: the operator's defaults (PJ_DEFAULT_CPU / PJ_DEFAULT_MEMORY, 4 and 16Gi out of the box).
    cpu: Optional[str] = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: Optional[str] = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: Optional[str] = None
    affinity: Optional[dict[str, Any]] = Field(
        None, description="The trainer pod's affinity (a Kubernetes Affinity object), passed through.")


class PersonalizationJobSpec(ApiModel):
    base_model: BaseModelSource
    method: Method
    concept: Concept
    prior_preservation: PriorPreservation = Field(default_factory=PriorPreservation)
    training: Training = Field(default_factory=Training)
    textual_inversion: TextualInversionOptions = Field(default_factory=TextualInversionOptions)
    dreambooth: DreamboothOptions = Field(default_factory=DreamboothOptions)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    ti_dreambooth: TiDreamboothOptions = Field(default_factory=TiDreamboothOptions)
    flow_matching: FlowMatchingOptions = Field(default_factory=FlowMatchingOptions)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    validation: Validation = Field(default_factory=Validation)
    reporting: Reporting = Field(default_factory=Reporting)
    output: Output = Field(default_factory=Output)
    resources: Resources = Field(default_factory=Resources)
    image: Optional[str] = Field(None, description="Trainer image override (default: the operator's setting).")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets to pull the trainer image with, besides the operator's own.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the trainer pod.")
    queue_name: Optional[str] = Field(None, description=(
        "Kueue LocalQueue; the Job then starts suspended. The label kueue.x-k8s.io/queue-name on the "
        "PersonalizationJob does the same."))
    service_account_name: Optional[str] = Field(None, description=(
        "An existing ServiceAccount the trainer pod runs as (cloud workload identity: IRSA, EKS Pod Identity, "
        "GKE Workload Identity). The operator then creates no ServiceAccount and binds the trainer's Role to "
        "this one. Unset: a ServiceAccount <name>-trainer made for the job."))
    packing: Packing = Field(Packing.auto, description=(
        "auto: the operator may train this job in one pod with compatible jobs of its namespace (same base "
        "model, image, precision, resolution and placement), each still its own resource; never: always a pod "
        "of its own."))
    active_deadline_seconds: Optional[int] = Field(None, ge=1)
    backoff_limit: int = Field(2, ge=0, le=100)
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _cross_field(self) -> "PersonalizationJobSpec":
        pp = self.prior_preservation
        if pp.enabled and self.method in (Method.textual_inversion, Method.ti_dreambooth):
            raise ValueError(f"priorPreservation.enabled: not supported by method {self.method.value}")
        if self.prior_preservation_enabled and not (self.concept.class_noun or pp.class_prompt):
            raise ValueError(
                "priorPreservation: needs concept.classNoun or priorPreservation.classPrompt "
                "(set priorPreservation.enabled: false to train without it)"
            )
        if self.training.max_steps is not None and self.training.min_steps > self.training.max_steps:
            raise ValueError("training.minSteps must not exceed training.maxSteps")
        if self.concept.initializer_token is None and self.concept.class_noun is None and self.method in (
            Method.textual_inversion,
            Method.custom_diffusion,
            Method.ti_dreambooth,
        ):
            raise ValueError(
                f"concept.initializerToken: method {self.method.value} needs an initializer token "
                "(or concept.classNoun)"
            )
        if ArtifactFormat.kohya in self.output.formats and self.method != Method.lora:
            raise ValueError(f"output.formats: kohya is a LoRA format; method {self.method.value} "
                             "writes diffusers artifacts only")
        if any("{class_noun}" in t for t in self.caption_templates) and not self.concept.class_noun:
            raise ValueError("concept.captionTemplate uses {class_noun} but concept.classNoun is not set")
        return self

    # ---- resolved values (per-method defaults applied) ------------------------------------

    @property
    def defaults(self) -> MethodDefaults:
        return METHOD_DEFAULTS[self.method]

    @property
    def max_steps(self) -> int:
        return self.training.max_steps or self.defaults.max_steps

    @property
    def learning_rate(self) -> float:
        return self.training.learning_rate or self.defaults.learning_rate

    @property
    def prior_preservation_enabled(self) -> bool:
        pp = self.prior_preservation.enabled
        return self.defaults.prior_preservation if pp is None else pp

    @property
    def window(self) -> int:
        """Criterion window in training steps."""
        return self.early_stopping.window or self.defaults.window

    @property
    def initializer_token(self) -> Optional[str]:
        return self.concept.initializer_token or self.concept.class_noun

    @property
    def caption_templates(self) -> list[str]:
        """The training caption templates (one is drawn per example): the concept's template, or
        the method's default ones, plus the concept's extra `captions`."""
        concept = self.concept
        if concept.caption_template is not None:
            base = [concept.caption_template]
        elif self.method == Method.textual_inversion:
            base = list(TEXTUAL_INVERSION_TEMPLATES)
        else:
            base = [DEFAULT_CAPTION_TEMPLATE]
        return [*base, *concept.captions]

    @property
    def flip_probability(self) -> float:
        flip = self.training.augmentation.flip
        return self.defaults.flip_probability if flip is None else flip

    @property
    def crop(self) -> Crop:
        return self.training.augmentation.crop or self.defaults.crop


class ObjectMeta(BaseModel):
    """The parts of metadata we read; everything else is passed through untouched."""

    model_config = ConfigDict(extra="allow")
    name: Optional[str] = None
    namespace: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Status: the trainer writes progress/earlyStop/... (also to result.json); the operator writes
# the lifecycle (phase, conditions, startTime, completionTime, jobName, attempts).
# --------------------------------------------------------------------------------------------


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: Optional[str] = None


class Progress(ApiModel):
    step: int = Field(0, ge=0)
    max_steps: int = Field(0, ge=0)
    percent: float = Field(0.0, ge=0.0, le=100.0)
    eta_seconds: Optional[float] = Field(None, ge=0.0, description="To maxSteps at the pace so far; none once the "
                                         "run has ended (step then says where it stopped).")
    elapsed_seconds: Optional[float] = Field(None, ge=0.0, description="Since the trainer started.")
    elapsed: Optional[str] = Field(None, description="elapsedSeconds as H:MM:SS (a kubectl column).")
    eta: Optional[str] = Field(None, description="etaSeconds as H:MM:SS (a kubectl column).")
    stage: Optional[str] = Field(None, description="For tiDreambooth: textualInversion or dreambooth.")


class EarlyStop(ApiModel):
    stopped: bool = False
    reason: Optional[StopReason] = None
    criterion: Optional[CriterionName] = None
    value: Optional[float] = None
    threshold: Optional[float] = None
    window: Optional[int] = Field(None, description="The criterion's window in evaluations.")
    window_steps: Optional[int] = Field(None, description="The same window in training steps (the spec's).")
    min_steps: Optional[int] = Field(None, description="No stop was allowed before this step.")
    step: Optional[int] = None
    steps_saved: Optional[int] = None
    fraction_saved: Optional[float] = None


class ReferenceInfo(ApiModel):
    size: int
    sub_batches: int = 1
    indices: list[int] = Field(default_factory=list)
    holdout: bool
    fixed: str = Field(description="5-bit code images/latents/noise/captions/timesteps, 1 = fixed")
    eval_every: int = 1


class Artifact(ApiModel):
    location: str
    files: list[str] = Field(default_factory=list, description="The final artifacts, relative to location.")
    snapshots: list[str] = Field(
        default_factory=list, description="Artifacts kept every output.snapshotEvery steps, relative to location.")


class TrainerReport(ApiModel):
    """What the trainer writes into status (and, identically, into result.json)."""

    model_config = ConfigDict(extra="forbid")
    progress: Optional[Progress] = None
    deterministic_loss: Optional[float] = None
    train_loss: Optional[float] = None
    convergence_value: Optional[float] = Field(None, description="The criterion's last value (4 significant "
                                               "digits; earlyStop.value and losses.csv keep them all).")
    convergence_threshold: Optional[float] = Field(None, description="The current stage's threshold.")
    timestep_losses: Optional[dict[str, float]] = Field(
        None, description="The last L_det of each reference slot, by its timestep (flow matching: sigma).")
    early_stop: Optional[EarlyStop] = None
    identifier: Optional[str] = None
    samples: Optional[str] = Field(None, description="The latest sample grid, relative to the output folder.")
    sample_seconds: Optional[float] = Field(None, ge=0.0, description="Time spent drawing grids while training "
                                            "(validation.everySteps), like the stages' trackingSeconds.")
    reference: Optional[ReferenceInfo] = None
    artifact: Optional[Artifact] = None
    stages: list[dict[str, Any]] = Field(default_factory=list)
    wall_seconds: Optional[float] = None
    message: Optional[str] = None


class RunResult(TrainerReport):
    """result.json: the status fields plus how the run computed (these two are not in the status)."""

    mixed_precision: Optional[MixedPrecision] = Field(None, description="The precision actually used.")
    processes: Optional[int] = Field(None, ge=1, description="Data-parallel processes that trained.")


class PackRef(ApiModel):
    """The pack a job trains in: one Job and pod shared with compatible jobs (written by the operator)."""

    job: str = Field(description="The pack's Job (also status.jobName).")
    slot: int = Field(ge=0, description="This job's place in the pack, 0 to the pack's size - 1.")
    members: list[str] = Field(default_factory=list, description=(
        "The pack's members as of this job's last phase change (its own name included)."))


class PersonalizationJobStatus(TrainerReport):
    # `extra=allow`: kopf keeps its own bookkeeping under status too.
    model_config = ConfigDict(extra="allow")
    phase: Optional[Phase] = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: Optional[int] = None
    start_time: Optional[str] = None
    completion_time: Optional[str] = None
    job_name: Optional[str] = None
    attempts: Optional[int] = None
    pack: Optional[PackRef] = None


class PersonalizationJob(ApiModel):
    model_config = ConfigDict(extra="forbid")
    api_version: Literal["personalization.dvar.dev/v1alpha1"] = f"{API_GROUP}/{API_VERSION}"  # type: ignore[assignment]
    kind: Literal["PersonalizationJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PersonalizationJobSpec
    status: Optional[PersonalizationJobStatus] = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A spec problem, with a message naming the field path (one line per problem)."""


def _path_part(part: Any) -> str:
    """One segment of a field path: `name`, `[3]` for list items, `['odd key']` for odd keys."""
    if isinstance(part, int):
        return f"[{part}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
        return f".{part}"
    return f"[{str(part)!r}]"


def format_validation_error(err: ValidationError, prefix: str = "spec") -> str:
    problems = []
    for e in err.errors():
        parts = [p for p in e["loc"] if not str(p).startswith("function-after")]
        path = "".join(_path_part(p) for p in parts).removeprefix(".")
        if prefix and path:
            path = f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"
        path = path or prefix
        msg = e["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {msg}")
    return "; ".join(problems)


def parse_spec(data: dict[str, Any]) -> PersonalizationJobSpec:
    """Validate a bare spec dict (camelCase keys)."""
    if not isinstance(data, dict):
        raise SpecError("spec: expected a mapping")
    try:
        return PersonalizationJobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def parse_job(data: Any) -> PersonalizationJob:
    """Accept a full PersonalizationJob manifest or a bare spec."""
    if not isinstance(data, dict):
        raise SpecError("config: expected a mapping (a PersonalizationJob manifest or its spec)")
    if "spec" in data or "kind" in data or "apiVersion" in data:
        kind = data.get("kind", KIND)
        if kind != KIND:
            raise SpecError(f"kind: expected {KIND}, got {kind!r}")
        try:
            return PersonalizationJob.model_validate({k: v for k, v in data.items() if k != "status"})
        except ValidationError as err:
            raise SpecError(format_validation_error(err, prefix="")) from None
    return PersonalizationJob(spec=parse_spec(data))


def load_job(path: str | Path) -> PersonalizationJob:
    """Load a YAML/JSON file holding a manifest or a bare spec."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"config file {str(p)!r} does not exist") from None
    except OSError as err:
        raise SpecError(f"config file {str(p)!r} cannot be read: {err.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SpecError(f"config file {str(p)!r} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    return parse_job(data)
