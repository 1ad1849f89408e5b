"""Mixed precision end to end (fp16 and bf16 really run on CPU): every method trains, samples and
saves artifacts that stock diffusers pipelines load and sample in fp32 and in half precision;
while training, frozen weights are in the half dtype and trained ones in fp32."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState

from personalize.methods import METHODS
from personalize.run import main
from personalize.spec import RunResult

from artifact_roundtrip import check_round_trip
from job_specs import job_spec
from test_cli import write_config

PRECISIONS = ["no", "bf16", "fp16"]  # fp16 runs on CPU through torch's CPU autocast (precision.py)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """One process runs several jobs here: each job creates its Accelerator with its own precision."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_job(tiny_pipeline_dir, concept_dir, method: str, precision: str) -> dict:
    spec = job_spec(tiny_pipeline_dir, concept_dir, method)
    spec["training"] = {**spec["training"], "maxSteps": 2, "mixedPrecision": precision}
    if method == "tiDreambooth":
        spec["tiDreambooth"]["stage1MaxSteps"] = 2
    return spec


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_samples_and_saves_in_each_precision(method, precision, tiny_pipeline_dir, concept_dir,
                                                                  tmp_path):
    out = tmp_path / "out"
    spec = tiny_job(tiny_pipeline_dir, concept_dir, method, precision)
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["mixedPrecision"] == precision and result["processes"] == 1
    RunResult.model_validate(result)
    assert result["earlyStop"]["reason"] == "MaxSteps"
    # One dtype (fp32) in every artifact whatever the training precision; the stock loaders sample
    # it in fp32 and in the half dtype the run trained in (bf16 for an fp32 run), unlike the base.
    check_round_trip(out, result, tiny_pipeline_dir, precision)


def cli(config, out, *extra) -> list[str]:
    return [sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(out), *extra]


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PJ_NAME", None)
    env.pop("PJ_NAMESPACE", None)
    return env


# Two processes cost three interpreters per run: a representative part of the matrix (every
# precision, the three artifact kinds: pipeline folder, LoRA weights, Custom Diffusion + embedding,
# and the two-stage method, whose stage 1 is Textual Inversion). All 30 cells:
# benchmarks/precision_matrix.py.
TWO_PROCESS_CASES = [("dreambooth", "no"), ("lora", "bf16"), ("customDiffusion", "fp16"), ("tiDreambooth", "fp16")]


@pytest.mark.slow
@pytest.mark.parametrize("method,precision", TWO_PROCESS_CASES)
def test_two_processes_train_in_each_precision(method, precision, tiny_pipeline_dir, concept_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_job(tiny_pipeline_dir, concept_dir, method, precision))
    proc = subprocess.run(cli(config, out, "--num-processes", "2"), capture_output=True, text=True, env=cli_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["mixedPrecision"] == precision and result["processes"] == 2
    assert result["earlyStop"]["step"] == 2
    # only the main process prints, one line per stage
    assert proc.stdout.count("stopped at step 2/2") == len(result["stages"])
    check_round_trip(out, result, tiny_pipeline_dir, precision)


@pytest.mark.slow
def test_two_processes_sigterm_then_resume_stop_at_the_same_step(concept_dir, tmp_path):
    from test_resume import STEP_LINE, read_rows, write_config as resume_config

    config = resume_config(tmp_path / "job.yaml", concept_dir, "lora")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with (tmp_path / "straight.log").open("w") as log:
        reference = subprocess.Popen(cli(config, straight, "--num-processes", "2"), stdout=log,
                                     stderr=subprocess.STDOUT, env=cli_env())
        proc = subprocess.Popen(cli(config, resumed, "--num-processes", "2"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=cli_env())
        lines, sent = [], False
        for line in proc.stdout:
            lines.append(line)
            match = STEP_LINE.match(line)
            if not sent and match and int(match.group(1)) >= 7:
                proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both processes
                sent = True
        assert proc.wait(timeout=600) == 143, "".join(lines[-30:])
        assert reference.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert sent
    (checkpoint,) = sorted((resumed / "checkpoints").glob("checkpoint-*"))
    interrupted_at = json.loads((checkpoint / "state.json").read_text())["step"]
    assert interrupted_at >= 7

    again = subprocess.run(cli(config, resumed, "--num-processes", "2"), capture_output=True, text=True,
                           env=cli_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {checkpoint}" in again.stderr
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((resumed / "result.json").read_text())
    assert b["processes"] == 2 and b["earlyStop"] == a["earlyStop"]
    assert b["earlyStop"]["reason"] == "ConvergenceThreshold"
    assert read_rows(resumed / "losses.csv") == read_rows(straight / "losses.csv")


@pytest.mark.parametrize("method", ["lora", "customDiffusion", "textualInversion"])
def test_frozen_weights_are_half_while_training_and_fp32_from_the_base_after(method, tiny_pipeline_dir, concept_dir):
    from personalize.data import load_concept_examples
    from personalize.identifier import setup_identifier
    from personalize.loop import train_stage
    from personalize.methods import learns_embedding, plan_stages
    from personalize.pipeline_io import load_base_pipeline, models_of
    from personalize.precision import NORM_LAYERS, make_accelerator
    from personalize.spec import BaseModelSource, parse_spec

    spec = parse_spec(tiny_job(tiny_pipeline_dir, concept_dir, method, "bf16"))
    base = load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir)))
    models = models_of(load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir))))
    identifier = setup_identifier(models.tokenizer, models.text_encoder, spec.concept.token,
                                  learns_embedding=learns_embedding(spec), num_vectors=1,
                                  initializer=spec.initializer_token)
    examples = load_concept_examples(spec.concept, identifier.text, 32)
    seen = []

    def on_step(_record):  # mid-training: what each weight is held in
        for module in (models.unet, models.text_encoder, models.vae):
            norms = {id(p) for layer in module.modules() if isinstance(layer, NORM_LAYERS) for p in layer.parameters()}
            for p in module.parameters():
                seen.append((p.requires_grad, id(p) in norms, p.dtype))

    (stage,) = plan_stages(spec)
    _, method = train_stage(stage, spec, models, identifier, examples, None, make_accelerator("bf16"), on_step)
    # Textual Inversion trains the token rows as parameters of their own, outside the modules
    trained = {dtype for grad, _, dtype in seen if grad} | {p.dtype for p in method.parameters}
    frozen = {dtype for grad, norm, dtype in seen if not grad and not norm}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    if learns_embedding(spec):  # the token's rows in the table are the trained fp32 rows, not rounded to bf16
        table = models.text_encoder.get_input_embeddings().weight
        assert table.dtype == torch.float32
        assert torch.equal(table[identifier.token_ids], method.identifier_rows[0].weight.detach())

    # after the stage: fp32 everywhere, frozen weights bit-identical to the base model's
    base_weights = {f"{part}.{n}": p for part in ("unet", "vae") for n, p in getattr(base, part).named_parameters()}
    for part in ("unet", "vae"):
        for name, p in getattr(models, part).named_parameters():
            assert p.dtype == torch.float32, name
            original = base_weights.get(f"{part}.{name.replace('.base_layer', '')}")
            if not p.requires_grad and original is not None:
                assert torch.equal(p, original), name


def test_deterministic_loss_in_bf16_repeats_exactly_and_stays_close_to_fp32(tiny_pipeline_dir, concept_dir):
    from personalize.data import load_concept_examples
    from personalize.pipeline_io import load_base_pipeline, models_of
    from personalize.precision import cast_for_training, make_accelerator
    from personalize.reference_batch import ReferenceBatch
    from personalize.spec import BaseModelSource, Concept

    models = models_of(load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir))))
    examples = load_concept_examples(Concept(images={"path": str(concept_dir)}, class_noun="triangle"), "zwx", 32)

    def reference():
        return ReferenceBatch(examples, size=2, models=models, text_encoder_trained=False)

    full = reference().deterministic_loss(models.unet, models.text_encoder)
    accelerator = make_accelerator("bf16")
    cast_for_training(models.modules(), [], torch.bfloat16)
    batch = reference()
    with accelerator.autocast():
        half = [batch.deterministic_loss(models.unet, models.text_encoder) for _ in range(2)]
    assert half[0] == half[1]  # fixed batch, same weights: the same value, bit for bit
    assert half[0] != full and half[0] == pytest.approx(full, rel=0.05)
