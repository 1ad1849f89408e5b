"""The training loop: how often L_det is evaluated never changes the training itself."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from personalize.criteria import window_in_evaluations
from personalize.data import load_concept_examples
from personalize.identifier import setup_identifier
from personalize.loop import train_stage
from personalize.methods import learns_embedding, plan_stages
from personalize.pipeline_io import load_base_pipeline, models_of
from personalize.spec import parse_spec

from conftest import job_spec


def run(pipeline_dir, concept_dir, eval_every: int, steps: int = 6):
    spec = job_spec(pipeline_dir, concept_dir, "textualInversion")
    spec["training"]["maxSteps"] = steps
    spec["earlyStopping"] = {"evalEvery": eval_every, "referenceBatchSize": 2, "criterion": "none"}
    spec = parse_spec(spec)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=learns_embedding(spec),
                             initializer="triangle")
    examples = load_concept_examples(spec.concept, ident.text, 32)
    rows = []
    train_stage(plan_stages(spec)[0], spec, models, ident, examples, None, Accelerator(cpu=True),
                lambda step, train, det, conv, seconds: rows.append((step, train, det)))
    return rows


def test_eval_every_changes_neither_training_nor_the_values_at_common_steps(tiny_pipeline_dir, concept_dir):
    every_step = run(tiny_pipeline_dir, concept_dir, 1)
    every_third = run(tiny_pipeline_dir, concept_dir, 3)
    assert [r[1] for r in every_step] == [r[1] for r in every_third]  # identical training losses
    assert [r[2] for r in every_third] == [None, None, every_step[2][2], None, None, every_step[5][2]]
    assert all(r[2] is not None for r in every_step)
    assert len({r[2] for r in every_step}) > 1  # TI moves the loss; it is not a constant


@pytest.mark.parametrize("steps, every, evaluations", [(310, 1, 310), (310, 5, 62), (440, 3, 147), (3, 5, 2)])
def test_window_in_evaluations_covers_the_same_steps(steps, every, evaluations):
    assert window_in_evaluations(steps, every) == evaluations
