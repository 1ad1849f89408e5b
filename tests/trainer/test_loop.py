"""The training loop: how often L_det is evaluated never changes the training itself."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from accelerate import Accelerator

from personalize.criteria import window_in_evaluations
from personalize.data import examples_of
from personalize.identifier import setup_identifier
from personalize.loop import train_stage
from personalize.methods import learns_embedding, plan_stages
from personalize.pipeline_io import load_base_pipeline, models_of
from personalize.spec import parse_spec

from job_specs import job_spec


def run(pipeline_dir, concept_dir, eval_every: int, steps: int = 6):
    spec = job_spec(pipeline_dir, concept_dir, "textualInversion")
    spec["training"]["maxSteps"] = steps
    spec["earlyStopping"] = {"evalEvery": eval_every, "referenceBatchSize": 2, "criterion": "none"}
    spec = parse_spec(spec)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=learns_embedding(spec),
                             initializer="triangle")
    examples = examples_of(spec, ident.text, 32)
    rows = []
    train_stage(plan_stages(spec)[0], spec, models, ident, examples, None, Accelerator(cpu=True),
                lambda r: rows.append((r.step, r.train_loss, r.deterministic_loss, r.evaluation_seconds, r.seconds)))
    return rows


def test_eval_every_changes_neither_training_nor_the_values_at_common_steps(tiny_pipeline_dir, concept_dir):
    every_step = run(tiny_pipeline_dir, concept_dir, 1)
    every_third = run(tiny_pipeline_dir, concept_dir, 3)
    assert [r[1] for r in every_step] == [r[1] for r in every_third]  # identical training losses
    assert [r[2] for r in every_third] == [None, None, every_step[2][2], None, None, every_step[5][2]]
    assert all(r[2] is not None for r in every_step)
    assert len({r[2] for r in every_step}) > 1  # TI moves the loss; it is not a constant
    # the tracking cost is timed at the evaluated steps only, and is part of the step's time
    assert [r[3] is not None for r in every_third] == [r[2] is not None for r in every_third]
    assert all(0 < r[3] < r[4] for r in every_step)


@pytest.mark.parametrize("steps, every, evaluations", [(310, 1, 310), (310, 5, 62), (440, 3, 147), (3, 5, 2)])
def test_window_in_evaluations_covers_the_same_steps(steps, every, evaluations):
    assert window_in_evaluations(steps, every) == evaluations


def train_dreambooth(pipeline_dir, concept_dir, **training):
    """Three DreamBooth steps with the text encoder trained too; (training losses, models)."""
    spec = job_spec(pipeline_dir, concept_dir, "dreambooth", dreambooth={"trainTextEncoder": True})
    spec["training"].update(training)
    spec = parse_spec(spec)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=False)
    losses = []
    train_stage(plan_stages(spec)[0], spec, models, ident, examples_of(spec, ident.text, 32), None,
                Accelerator(cpu=True), lambda record: losses.append(record.train_loss))
    return losses, models


def test_gradient_checkpointing_recomputes_activations_and_changes_no_result(tiny_pipeline_dir, concept_dir, monkeypatch):
    plain_losses, plain = train_dreambooth(tiny_pipeline_dir, concept_dir)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint  # what diffusers' UNet blocks call when enabled
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    losses, models = train_dreambooth(tiny_pipeline_dir, concept_dir, gradientCheckpointing=True)

    assert not plain.unet.is_gradient_checkpointing and not plain.text_encoder.is_activation_checkpointing
    assert models.unet.is_gradient_checkpointing and models.text_encoder.is_activation_checkpointing
    assert calls  # the UNet really went through torch's checkpoint
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, p), q in zip(models.unet.named_parameters(), plain.unet.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def gradient_norms_at_each_step(monkeypatch) -> list[float]:
    """The global norm of the gradients AdamW applies, recorded at every optimizer step."""
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return norms


def test_gradients_are_clipped_to_max_grad_norm(tiny_pipeline_dir, concept_dir, monkeypatch):
    norms = gradient_norms_at_each_step(monkeypatch)
    train_dreambooth(tiny_pipeline_dir, concept_dir, maxGradNorm=0)
    unclipped, norms[:] = list(norms), []
    train_dreambooth(tiny_pipeline_dir, concept_dir, maxGradNorm=0.05)
    assert len(norms) == len(unclipped) == 3
    assert max(unclipped) > 0.05  # so clipping had something to do
    assert all(n <= 0.05 * (1 + 1e-4) for n in norms), norms
