"""The reference batch and the deterministic loss L_det of DVAR (the loss on a batch whose
random components are drawn once and then kept fixed).

At the start of training R examples (x R per sub-batch, S sub-batches) are drawn once, with a
generator of their own, and each of the five random components of the diffusion loss is fixed:

    images      which training image each slot holds (and so its original size and crop corner)
    latents     the VAE posterior sample z_0 = mean(x) + std(x) * n  (n is fixed per slot)
    noise       eps
    captions    which caption template each slot uses (an image with a caption file: its own
                caption, which goes with the image)
    timesteps   t; distinct across the slots (a random permutation of all timesteps)

Any subset may instead be re-sampled at every evaluation (the paper's 5-bit code). The
reference generator is separate from the training generator, so evaluating (or not) never
changes the training trajectory.

`evaluate` also gives each slot's own loss, named by its timestep (or sigma): L_det is a mean over
timesteps, and practitioners read each timestep on its own.

Everything that does not depend on trained weights is computed once: the latents (the VAE is
always frozen), and the caption embeddings when the text encoder's input is frozen. An evaluation
runs under `torch.inference_mode` and switches the models to eval mode through a flat list of
their modules (`ModeSwitch`) rather than `Module.eval()`/`train()`, whose recursive walk costs
~5% of the tiny UNet's forward: tracking is cheaper, the values are the same (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from personalize.data import ConceptExamples
from personalize.diffusion import diffusion_loss, encode_captions, latent_distribution, scaled_latents
from personalize.families.base import Conditioning, Models
from personalize.preflight import check_reference_fits
from personalize.spec import EarlyStopping, FixedComponents, ReferenceInfo

# Offset that separates the reference generator's stream from the training generator's.
REFERENCE_SEED_OFFSET = 0x5EED_DE7


class ModeSwitch:
    """Switches a module tree between train and eval mode the way `Module.train(mode)` does,
    with one flag write per module instead of a recursive walk through `Module.__setattr__`.

    The modules are listed once, on first use: the tree must not change afterwards (a training
    stage adds its adapters before the reference batch is built). A tree with a module that
    overrides `train()` (e.g. PEFT's DoRA) is switched with `Module.train` itself.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._modules: Optional[list[torch.nn.Module]] = None
        self._plain: Optional[bool] = None

    def _listed(self) -> Optional[list[torch.nn.Module]]:
        if self._plain is None:
            modules = list(self.module.modules())
            self._plain = all(type(m).train is torch.nn.Module.train for m in modules)
            self._modules = modules if self._plain else None
        return self._modules

    def set(self, training: bool) -> None:
        """Every module of the tree in train (True) or eval (False) mode."""
        modules = self._listed()
        if modules is None:
            self.module.train(training)
            return
        for m in modules:
            m.__dict__["training"] = training  # where nn.Module keeps the flag (set in its __init__)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the reference batch."""

    loss: float  # L_det: the value `deterministic_loss` returns, to the bit
    # each slot's own loss keyed by its label (`ReferenceBatch.slot_labels`), in ascending
    # timestep: L_det is a mean over timesteps, and some dominate it
    timestep_losses: dict[str, float]


class ReferenceBatch:
    def __init__(
        self,
        examples: ConceptExamples,
        *,
        size: int,
        sub_batches: int = 1,
        fixed: FixedComponents = FixedComponents(),
        holdout: bool = False,
        seed: int = 0,
        models: Models,
        text_encoder_trained: bool,
        eval_every: int = 1,
    ):
        n_slots = size * sub_batches
        n_images = len(examples)
        check_reference_fits(n_images, EarlyStopping(reference_batch_size=size, reference_sub_batches=sub_batches, holdout=holdout))
        self.examples = examples
        self.size, self.sub_batches, self.n_slots = size, sub_batches, n_slots
        self.fixed, self.holdout, self.eval_every = fixed, holdout, eval_every
        self.models, self.vae = models, models.vae
        self.text_encoder_trained = text_encoder_trained
        self.num_timesteps = models.family.num_timesteps(models)
        self.generator = self._generator(seed)
        self.evaluations = 0
        self._modes: dict[int, ModeSwitch] = {}  # per model evaluated: its mode switch

        # Draw every component once, in a fixed order, whether or not it stays fixed: the
        # reference examples (and so the held-out set) then depend on the seed only.
        g = self.generator
        self.indices: list[int] = self._draw_indices(n_images, n_slots, g)
        self.image_pool = self.indices if holdout else list(range(n_images))
        mean, std = self._posterior(self.indices)  # [S*R, C, h, w] each
        self.latent_shape = tuple(mean.shape[1:])
        self.latent_noise = self._randn()
        self.noise = self._randn()
        self.caption_ids = self._draw_captions()
        self.timesteps = self._draw_timesteps()

        self._posterior_cache = (mean, std) if fixed.images else None
        self._latents_cache = scaled_latents(self.vae, mean, std, self.latent_noise) if (fixed.images and fixed.latents) else None
        self._caption_cache: Optional[Conditioning] = None  # filled at the first evaluation when allowed

    # ---- the sets the trainer uses ---------------------------------------------------------

    @staticmethod
    def _generator(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed) + REFERENCE_SEED_OFFSET)

    @staticmethod
    def _draw_indices(n_images: int, n_slots: int, generator: torch.Generator) -> list[int]:
        """The reference examples: the first draw of the reference generator."""
        return torch.randperm(n_images, generator=generator)[:n_slots].tolist()

    @classmethod
    def select_indices(cls, n_images: int, n_slots: int, seed: int) -> list[int]:
        """The reference examples for a seed, without building the batch (other processes)."""
        return cls._draw_indices(n_images, n_slots, cls._generator(seed))

    @staticmethod
    def training_split(examples: ConceptExamples, indices: list[int], holdout: bool) -> ConceptExamples:
        if not holdout:
            return examples
        held = set(indices)
        return examples.subset([i for i in range(len(examples)) if i not in held])

    @property
    def training_examples(self) -> ConceptExamples:
        """The examples training may draw from: without the reference ones when holding out."""
        return self.training_split(self.examples, self.indices, self.holdout)

    def info(self) -> ReferenceInfo:
        return ReferenceInfo(
            size=self.size,
            sub_batches=self.sub_batches,
            indices=list(self.indices),
            holdout=self.holdout,
            fixed=self.fixed.code(),
            eval_every=self.eval_every,
        )

    # ---- drawing ---------------------------------------------------------------------------

    def _randn(self) -> torch.Tensor:
        return torch.randn((self.n_slots, *self.latent_shape), generator=self.generator)

    def _draw_captions(self) -> list[int]:
        return torch.randint(len(self.examples.captions), (self.n_slots,), generator=self.generator).tolist()

    def _draw_timesteps(self) -> torch.Tensor:
        """Distinct timesteps across the slots (with repeats only if slots outnumber timesteps)."""
        perm = torch.randperm(self.num_timesteps, generator=self.generator)
        return perm.repeat(-(-self.n_slots // self.num_timesteps))[: self.n_slots].long()

    def _draw_images(self) -> list[int]:
        pool = torch.tensor(self.image_pool)
        if self.n_slots <= len(pool):
            return pool[torch.randperm(len(pool), generator=self.generator)[: self.n_slots]].tolist()
        return pool[torch.randint(len(pool), (self.n_slots,), generator=self.generator)].tolist()

    @torch.no_grad()
    def _posterior(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = latent_distribution(self.vae, self.examples.images[indices])
        return mean.float().cpu(), std.float().cpu()

    # ---- one evaluation --------------------------------------------------------------------

    def components(self, text_encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
        """latents [S*R,C,h,w], noise [S*R,C,h,w], timesteps [S*R], the captions' conditioning
        (e.g. embeddings [S*R,77,D]) for this evaluation: fixed parts reused, the others re-sampled (in a fixed order)."""
        fixed = self.fixed
        indices = self.indices if fixed.images else self._draw_images()
        latent_noise = self.latent_noise if fixed.latents else self._randn()
        noise = self.noise if fixed.noise else self._randn()
        caption_ids = self.caption_ids if fixed.captions else self._draw_captions()
        timesteps = self.timesteps if fixed.timesteps else self._draw_timesteps()

        if self._latents_cache is not None:
            latents = self._latents_cache
        else:
            mean, std = self._posterior_cache if self._posterior_cache is not None else self._posterior(indices)
            latents = scaled_latents(self.vae, mean, std, latent_noise)

        # an image's own caption (a caption file) changes with the image when images are re-sampled
        own_captions = self.examples.image_captions is not None
        cacheable = fixed.captions and (fixed.images or not own_captions) and not self.text_encoder_trained
        if cacheable and self._caption_cache is not None:
            embeddings = self._caption_cache
        else:
            captions = self.examples.captions_for(indices, caption_ids)
            device = next(text_encoder.parameters()).device
            embeddings = encode_captions(self.models, text_encoder, captions, device).detached_cpu()
            if cacheable:
                self._caption_cache = embeddings
        # each slot's original size and crop corner: fixed together with its image
        embeddings = embeddings.with_image_geometry(self.examples.geometry[indices])
        return latents, noise, timesteps, embeddings

    def _mode(self, module: torch.nn.Module) -> ModeSwitch:
        switch = self._modes.get(id(module))
        if switch is None or switch.module is not module:
            switch = self._modes[id(module)] = ModeSwitch(module)
        return switch

    @property
    def captions_cached(self) -> bool:
        """Whether the caption embeddings are reused (the text encoder then is not run)."""
        return self._caption_cache is not None

    def deterministic_loss(self, denoiser, text_encoder) -> float:
        """L_det: the training loss on the reference batch, averaged over its sub-batches.

        Under inference mode, with the denoiser (and the text encoder, when it runs) in eval
        mode; each is returned to the mode it was in."""
        return self._evaluated(self._loss, denoiser, text_encoder)

    def slot_losses(self, denoiser, text_encoder) -> list[float]:
        """The loss of each slot on its own, in slot order (their mean is L_det up to rounding):
        for studies of the batch itself, e.g. what a smaller batch or other timesteps would give."""
        return self._evaluated(self._per_slot, denoiser, text_encoder)

    def evaluate(self, denoiser, text_encoder) -> Evaluation:
        """L_det and each slot's loss from one pass over the reference batch (no extra forward):
        the per-timestep view of the same numbers."""
        loss, slots = self._evaluated(self._loss_and_slots, denoiser, text_encoder)
        labels = self.slot_labels
        order = range(self.n_slots)
        if self.fixed.timesteps:
            order = sorted(order, key=lambda i: (int(self.timesteps[i]), i))
        return Evaluation(loss, {labels[i]: slots[i] for i in order})

    @property
    def slot_labels(self) -> list[str]:
        """A stable name per slot, in slot order: its timestep ("t=0999"; flow matching: its
        sigma), or "slot=3" when the timesteps are re-sampled at each evaluation (then a slot has
        no timestep of its own). A timestep that two slots share gets "#2" on its second slot."""
        if not self.fixed.timesteps:
            return [f"slot={i}" for i in range(self.n_slots)]
        family, labels, seen = self.models.family, [], {}
        for t in self.timesteps.tolist():
            label = family.timestep_label(self.models, int(t))
            seen[label] = seen.get(label, 0) + 1
            labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
        return labels

    def _evaluated(self, compute, denoiser, text_encoder):
        # the text encoder runs only while its embeddings are not cached
        models = [denoiser] if self.captions_cached else [denoiser, text_encoder]
        was_training = [m.training for m in models]
        for m in models:
            self._mode(m).set(False)
        try:
            with torch.inference_mode():
                result = compute(denoiser, text_encoder)
        finally:
            for m, training in zip(models, was_training):
                self._mode(m).set(training)
        self.evaluations += 1
        return result

    def _sub_batch_losses(self, denoiser, text_encoder, reduction: str) -> list:
        latents, noise, timesteps, embeddings = self.components(text_encoder)
        # fp32 inputs (under mixed precision the caller's autocast runs the denoiser in the half
        # dtype); the squared error and the mean over slots and sub-batches stay fp32.
        device = denoiser.device
        losses = []
        for s in range(self.sub_batches):
            part = slice(s * self.size, (s + 1) * self.size)
            losses.append(diffusion_loss(
                denoiser,
                self.models,
                latents[part].to(device, torch.float32),
                noise[part].to(device, torch.float32),
                timesteps[part].to(device),
                embeddings[part].to(device, torch.float32),
                reduction=reduction,
            ))
        return losses

    def _loss(self, denoiser, text_encoder) -> float:
        parts = self._sub_batch_losses(denoiser, text_encoder, "mean")
        return sum(float(loss) for loss in parts) / self.sub_batches

    def _loss_and_slots(self, denoiser, text_encoder) -> tuple[float, list[float]]:
        parts = self._sub_batch_losses(denoiser, text_encoder, "both")  # (mean, [size]) each
        loss = sum(float(mean) for mean, _ in parts) / self.sub_batches  # as `_loss` reduces
        return loss, torch.cat([per_slot for _, per_slot in parts]).float().cpu().tolist()

    def _per_slot(self, denoiser, text_encoder) -> list[float]:
        parts = self._sub_batch_losses(denoiser, text_encoder, "none")  # [size] each
        return torch.cat(parts).float().cpu().tolist()

    # ---- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the seed: the generator that decides every
        re-sampled component is saved and restored with the other random streams (last)."""
        return {"indices": list(self.indices), "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["indices"]) != self.indices:
            raise ValueError("the reference batch differs from the checkpoint's (other images or seed?)")
        self.evaluations = int(state["evaluations"])
