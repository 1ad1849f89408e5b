"""The reference batch and the deterministic loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personalize.data import Augment, load_concept_examples
from personalize.errors import TrainerInputError
from personalize.pipeline_io import models_of
from personalize.reference_batch import ReferenceBatch
from personalize.spec import Concept, FixedComponents

COMPONENTS = ("images", "latents", "noise", "captions", "timesteps")


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    """Shared by the module's tests: none of them changes the weights for good."""
    from personalize.pipeline_io import load_base_pipeline
    from personalize.spec import BaseModelSource

    return models_of(load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir))))


@pytest.fixture
def examples(concept_dir):
    concept = Concept.model_validate(
        {
            "images": {"path": str(concept_dir)},
            "classNoun": "triangle",
            "captions": ["{token} on a table", "a picture of a {token} thing", "{token}"],
        }
    )
    return load_concept_examples(concept, "lun", 32)


def make(models, examples, **kwargs):
    options = dict(size=2, seed=0, text_encoder_trained=False)
    options.update(kwargs)
    return ReferenceBatch(
        examples, models=models, **options
    )


def test_deterministic_loss_is_bit_identical_across_evaluations(models, examples):
    ref = make(models, examples, size=3, sub_batches=2)
    values = [ref.deterministic_loss(models.unet, models.text_encoder) for _ in range(3)]
    assert values[0] == values[1] == values[2]
    # ... and across a rebuilt batch with the same seed (it depends on the seed only).
    again = make(models, examples, size=3, sub_batches=2)
    assert again.deterministic_loss(models.unet, models.text_encoder) == values[0]


@pytest.mark.parametrize("component", COMPONENTS)
def test_resampling_a_component_makes_the_loss_vary(models, examples, component):
    fixed = FixedComponents(**{component: False})
    ref = make(models, examples, size=3, fixed=fixed)
    values = [ref.deterministic_loss(models.unet, models.text_encoder) for _ in range(4)]
    assert len(set(values)) > 1, values
    assert ref.info().fixed == "".join("0" if c == component else "1" for c in COMPONENTS)


def test_timesteps_are_distinct_and_examples_distinct(models, examples):
    ref = make(models, examples, size=3, sub_batches=2)
    assert len(set(ref.timesteps.tolist())) == 6
    assert len(set(ref.indices)) == 6


def test_sub_batches_average_their_losses(models, examples):
    ref = make(models, examples, size=2, sub_batches=2)
    both = ref.deterministic_loss(models.unet, models.text_encoder)
    latents, noise, timesteps, emb = ref.components(models.text_encoder)
    from personalize.diffusion import diffusion_loss

    with torch.no_grad():
        parts = [
            float(diffusion_loss(models.unet, models, latents[s], noise[s], timesteps[s], emb[s]))
            for s in (slice(0, 2), slice(2, 4))
        ]
    assert both == pytest.approx(sum(parts) / 2, rel=1e-6)


def test_slot_losses_are_each_slot_alone_and_average_to_the_deterministic_loss(models, examples):
    from personalize.diffusion import diffusion_loss

    ref = make(models, examples, size=2, sub_batches=2)
    slots = ref.slot_losses(models.unet, models.text_encoder)
    assert len(slots) == 4 and len(set(slots)) == 4  # distinct timesteps: distinct losses
    assert sum(slots) / 4 == pytest.approx(ref.deterministic_loss(models.unet, models.text_encoder), rel=1e-6)
    latents, noise, timesteps, emb = ref.components(models.text_encoder)
    with torch.no_grad():
        alone = float(diffusion_loss(models.unet, models, latents[2:3], noise[2:3], timesteps[2:3], emb[2:3]))
    assert slots[2] == pytest.approx(alone, rel=1e-5)
    assert ref.evaluations == 2


def test_holdout_removes_reference_examples_from_training(models, examples):
    held = make(models, examples, size=2, holdout=True)
    kept = held.training_examples
    assert len(kept) == len(examples) - 2
    held_files = {examples.files[i] for i in held.indices}
    assert held_files.isdisjoint(kept.files)
    assert held.info().holdout is True
    reused = make(models, examples, size=2, holdout=False)
    assert len(reused.training_examples) == len(examples)
    assert reused.indices == held.indices  # the same seed picks the same reference examples
    assert ReferenceBatch.select_indices(len(examples), 2, 0) == held.indices


def test_reference_larger_than_the_images_is_an_error(models, examples):
    with pytest.raises(TrainerInputError, match="8 reference examples, but the concept has only 6 image"):
        make(models, examples, size=4, sub_batches=2)
    with pytest.raises(TrainerInputError, match="leaves no training images"):
        make(models, examples, size=6, holdout=True)


def test_caption_embeddings_are_encoded_once_when_the_text_encoder_is_frozen(models, examples, monkeypatch):
    import personalize.reference_batch as rb

    calls = []
    real = rb.encode_captions
    monkeypatch.setattr(rb, "encode_captions", lambda *a, **k: calls.append(1) or real(*a, **k))
    frozen = make(models, examples)
    for _ in range(3):
        frozen.deterministic_loss(models.unet, models.text_encoder)
    assert len(calls) == 1
    trained = make(models, examples, text_encoder_trained=True)
    for _ in range(3):
        trained.deterministic_loss(models.unet, models.text_encoder)
    assert len(calls) == 4


@pytest.mark.parametrize("trained", [True, False])
def test_caption_embeddings_follow_the_text_encoder_only_while_it_is_trained(models, examples, trained):
    """A trained text encoder is re-run at every evaluation; a frozen one is encoded once and cached.

    The perturbation adds 1.0 to the final layer norm's bias, which shifts every output feature
    by exactly 1.0 whatever the weights are, so the check does not rest on how a library
    initialises random weights.
    """
    ref = make(models, examples, text_encoder_trained=trained)
    before = ref.components(models.text_encoder)[3]["encoder_hidden_states"].clone()
    (bias,) = [p for name, p in models.text_encoder.named_parameters() if name.endswith("final_layer_norm.bias")]
    saved = bias.detach().clone()
    with torch.no_grad():
        bias += 1.0
    try:
        after = ref.components(models.text_encoder)[3]["encoder_hidden_states"]
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    if trained:
        torch.testing.assert_close(after - before, torch.ones_like(before))
    else:
        assert torch.equal(after, before)


def test_v_prediction_target(models, examples):
    from diffusers import DDPMScheduler

    v_scheduler = DDPMScheduler.from_config(models.noise_scheduler.config, prediction_type="v_prediction")
    eps = make(models, examples).deterministic_loss(models.unet, models.text_encoder)
    v = ReferenceBatch(
        examples, size=2, seed=0, text_encoder_trained=False, models=dataclasses.replace(models, noise_scheduler=v_scheduler),
    ).deterministic_loss(models.unet, models.text_encoder)
    assert v != eps


def test_augmentation_never_reaches_the_reference_batch(models, examples, concept_dir):
    """Flipping every training image changes the batches training draws, not L_det."""
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}, "classNoun": "triangle",
                                      "captions": ["{token} on a table", "a picture of a {token} thing", "{token}"]})
    augmented = load_concept_examples(concept, "lun", 32, augment=Augment(flip=1.0, random_crop=True))
    plain_ref, augmented_ref = make(models, examples, size=3), make(models, augmented, size=3)
    assert torch.equal(plain_ref._latents_cache, augmented_ref._latents_cache)
    loss = plain_ref.deterministic_loss(models.unet, models.text_encoder)
    assert augmented_ref.deterministic_loss(models.unet, models.text_encoder) == loss
    assert not torch.equal(augmented.sample(3, torch.Generator().manual_seed(0))[0],
                           examples.sample(3, torch.Generator().manual_seed(0))[0])


def _plain_deterministic_loss(ref, denoiser, text_encoder) -> float:
    """L_det the straightforward way: Module.eval(), no_grad, the components and the loss."""
    from personalize.diffusion import diffusion_loss

    denoiser.eval()
    text_encoder.eval()
    try:
        with torch.no_grad():
            latents, noise, timesteps, emb = ref.components(text_encoder)
            parts = [
                float(diffusion_loss(denoiser, ref.models, latents[p], noise[p], timesteps[p], emb[p]))
                for p in (slice(s * ref.size, (s + 1) * ref.size) for s in range(ref.sub_batches))
            ]
    finally:
        denoiser.train()
        text_encoder.train()
    return sum(parts) / len(parts)


@pytest.mark.parametrize("text_encoder_trained", [False, True])
def test_the_fast_evaluation_gives_bit_identical_values_and_restores_the_modes(models, examples, text_encoder_trained):
    """Inference mode, the flat mode switch and the cached captions change the cost, not L_det:
    equal to the last bit to the plain evaluation, on a UNet with LoRA adapters whose dropout
    would change the value if eval mode were not reached."""
    from peft import LoraConfig

    unet = models.unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5, target_modules=["to_q", "to_v"]),
                     adapter_name="fast_eval_test")
    try:
        with torch.no_grad():  # non-zero B matrices: the adapters (and their dropout) count
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.05)
        unet.train()
        models.text_encoder.train()
        ref = make(models, examples, size=2, sub_batches=2, text_encoder_trained=text_encoder_trained)
        fast = [ref.deterministic_loss(unet, models.text_encoder) for _ in range(3)]
        assert all(m.training for m in unet.modules()) and all(m.training for m in models.text_encoder.modules())
        plain = _plain_deterministic_loss(ref, unet, models.text_encoder)
        assert fast == [plain] * 3
        # a denoiser in eval mode stays there
        unet.eval()
        assert ref.deterministic_loss(unet, models.text_encoder) == plain
        assert not any(m.training for m in unet.modules())
    finally:
        unet.delete_adapters("fast_eval_test")
        unet.train()
        models.text_encoder.train()


def test_the_mode_switch_falls_back_to_train_for_modules_that_override_it():
    from personalize.reference_batch import ModeSwitch

    class Counting(torch.nn.Module):
        calls: list[bool] = []

        def train(self, mode: bool = True):
            Counting.calls.append(mode)
            return super().train(mode)

    tree = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(Counting(), torch.nn.Dropout(0.5)))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for module, overridden in ((tree, True), (plain, False)):
        Counting.calls.clear()
        switch = ModeSwitch(module)
        switch.set(False)
        assert not any(m.training for m in module.modules())
        switch.set(True)
        assert all(m.training for m in module.modules())
        assert Counting.calls == ([False, True] if overridden else [])


@pytest.mark.parametrize("sub_batches", [1, 3])
def test_evaluate_gives_the_deterministic_loss_to_the_bit_and_each_slot_by_its_timestep(models, examples, sub_batches):
    ref = make(models, examples, size=2, sub_batches=sub_batches)
    evaluation = ref.evaluate(models.unet, models.text_encoder)
    assert evaluation.loss == ref.deterministic_loss(models.unet, models.text_encoder)  # ==, not approx
    # one entry per slot, named by the slot's own timestep, ascending
    timesteps = ref.timesteps.tolist()
    assert list(evaluation.timestep_losses) == [f"t={t:04d}" for t in sorted(timesteps)]
    # the same numbers as each slot evaluated alone
    alone = dict(zip((f"t={t:04d}" for t in timesteps), ref.slot_losses(models.unet, models.text_encoder)))
    assert evaluation.timestep_losses == alone
    assert sum(alone.values()) / len(alone) == pytest.approx(evaluation.loss, rel=1e-6)


def test_slots_are_named_by_index_when_their_timesteps_are_redrawn(models, examples):
    ref = make(models, examples, size=3, fixed=FixedComponents(timesteps=False))
    first, second = (ref.evaluate(models.unet, models.text_encoder).timestep_losses for _ in range(2))
    assert list(first) == list(second) == ["slot=0", "slot=1", "slot=2"]
    assert first != second  # the slots' timesteps moved


def test_a_timestep_two_slots_share_gets_a_distinct_name(models, examples):
    ref = make(models, examples, size=3)
    ref.timesteps = torch.tensor([5, 900, 5])
    assert ref.slot_labels == ["t=0005", "t=0900", "t=0005#2"]
