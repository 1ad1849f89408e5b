"""The model families beyond SD 1.x/2.x (SDXL, SD3, FLUX.1) on tiny random-weight pipelines.

Per supported method x family: a few steps train through the real CLI; the deterministic loss is
bit-constant while the weights are frozen and moves once they train; the artifact loads in the
family's stock diffusers pipeline (`load_lora_weights`, `from_pretrained`) and changes its output.
Resume after SIGTERM is checked on FLUX.1 (the most involved conditioning) in test_resume.py's way.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

import tiny_families
from artifact_files import artifact_content
from personalize.data import load_concept_examples
from personalize.pipeline_io import load_base_pipeline, models_of
from personalize.reference_batch import ReferenceBatch
from personalize.run import main
from personalize.spec import BaseModelSource, Concept, FixedComponents

FAMILIES = ["sdxl", "flux", "sd3"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: lambda name=name: _built(root, name) for name in FAMILIES}


_BUILT: dict = {}


def _built(root, name):
    if name not in _BUILT:
        _BUILT[name] = tiny_families.BUILDERS[name](root / name)
    return _BUILT[name]


def job(folder, concept_dir, family, method="lora", **sections) -> dict:
    spec = {
        "baseModel": {"path": str(folder)},
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle", "token": "auto"},
        "training": {"maxSteps": 3, "batchSize": 2, "learningRate": 5e-2, "resolution": tiny_families.RESOLUTION.get(family, 32)},
        "earlyStopping": {"criterion": "none", "evalEvery": 1, "referenceBatchSize": 2},
        "priorPreservation": {"enabled": False},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2, "prompts": ["a photo of {token}"]},
    }
    spec.update(sections)
    return {"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
            "metadata": {"name": f"{family}-{method}", "namespace": "default"}, "spec": spec}


def run_job(manifest: dict, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    with (out / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    return out, result, rows


def generate(pipe, family: str, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    size = tiny_families.RESOLUTION[family]
    return pipe(prompt, num_inference_steps=2, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def stock_pipeline(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)


CASES = [
    ("sdxl", "lora", {}),
    ("sdxl", "lora", {"priorPreservation": {"enabled": True, "numClassImages": 2, "inferenceSteps": 2}}),  # DreamBooth-LoRA
    ("flux", "lora", {}),
    ("flux", "lora", {"flowMatching": {"weightingScheme": "logit_normal", "guidanceScale": 1.0}}),
    ("sd3", "lora", {"flowMatching": {"weightingScheme": "mode"}}),
]


@pytest.mark.parametrize("family,method,sections", CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_lora_trains_and_changes_the_stock_pipeline(family, method, sections, family_dirs, concept_dir, tmp_path):
    folder = family_dirs[family]()
    out, result, rows = run_job(job(folder, concept_dir, family, method, **sections), tmp_path)
    assert result["earlyStop"]["reason"] == "MaxSteps" and result["earlyStop"]["step"] == 3
    det = [float(r["deterministic_loss"]) for r in rows]
    assert len(det) == 3 and all(np.isfinite(det)) and len(set(det)) > 1  # L_det moves as the weights train
    assert "pytorch_lora_weights.safetensors" in result["artifact"]["files"]

    pipe = stock_pipeline(folder)
    prompt = f"a photo of {result['identifier']}"
    plain = generate(pipe, family, prompt)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert not np.array_equal(generate(pipe, family, prompt), plain)


def test_sdxl_full_dreambooth_saves_a_stock_pipeline(family_dirs, concept_dir, tmp_path):
    folder = family_dirs["sdxl"]()
    out, result, rows = run_job(job(folder, concept_dir, "sdxl", "dreambooth", training={
        "maxSteps": 2, "batchSize": 1, "learningRate": 1e-3, "resolution": 32}), tmp_path)
    assert result["artifact"]["files"] == ["pipeline"]
    from diffusers import StableDiffusionXLPipeline

    trained = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    prompt = f"a photo of {result['identifier']}"
    assert not np.array_equal(generate(trained, "sdxl", prompt), generate(stock_pipeline(folder), "sdxl", prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_loss_is_constant_while_frozen(family, family_dirs, concept_dir):
    from personalize.spec import parse_spec

    folder = family_dirs[family]()
    spec = parse_spec(job(folder, concept_dir, family)["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}, "captions": ["{token} on a table", "{token}"]})
    examples = load_concept_examples(concept, "lun", tiny_families.RESOLUTION[family])

    def reference(**fixed):
        return ReferenceBatch(examples, size=2, seed=0, models=models, text_encoder_trained=False,
                              fixed=FixedComponents(**fixed))

    frozen = reference()
    values = [frozen.deterministic_loss(models.denoiser, models.text_encoder) for _ in range(3)]
    assert values[0] == values[1] == values[2]
    assert reference().deterministic_loss(models.denoiser, models.text_encoder) == values[0]  # seed only
    # Each component matters: re-sampling timesteps (sigmas) or noise makes it vary.
    for component in ("timesteps", "noise", "latents"):
        varying = reference(**{component: False})
        assert len({varying.deterministic_loss(models.denoiser, models.text_encoder) for _ in range(3)}) > 1, component
    # ... and it changes once the weights do.
    with torch.no_grad():
        first = next(p for p in models.denoiser.parameters() if p.ndim == 2)
        first.add_(0.05 * torch.ones_like(first))
    assert frozen.deterministic_loss(models.denoiser, models.text_encoder) != values[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_holdout_reference_images_leave_training_and_keep_the_loss_fixed(family, family_dirs, concept_dir):
    from personalize.spec import parse_spec

    folder = family_dirs[family]()
    spec = parse_spec(job(folder, concept_dir, family)["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}})
    examples = load_concept_examples(concept, "lun", tiny_families.RESOLUTION[family])
    held = ReferenceBatch(examples, size=2, seed=0, models=models, text_encoder_trained=False, holdout=True)
    assert len(held.training_examples.files) == len(examples.files) - 2
    assert not set(held.training_examples.files) & {examples.files[i] for i in held.indices}
    values = {held.deterministic_loss(models.denoiser, models.text_encoder) for _ in range(2)}
    assert len(values) == 1 and np.isfinite(values.pop())


def test_flux_guidance_input_is_the_fixed_scale(family_dirs, concept_dir, monkeypatch):
    from personalize.spec import parse_spec

    folder = family_dirs["flux"]()
    spec = parse_spec(job(folder, concept_dir, "flux", flowMatching={"guidanceScale": 2.5})["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    seen = []
    real = models.denoiser.forward
    monkeypatch.setattr(models.denoiser, "forward", lambda *a, **k: seen.append(k["guidance"]) or real(*a, **k))
    cond = models.family.encode_prompts(models, models.text_encoder, ["a", "b"], "cpu")
    latents = torch.zeros(2, 1, 16, 16)
    models.family.loss(models.denoiser, models, latents, torch.ones_like(latents), torch.tensor([1, 500]), cond)
    assert seen and torch.equal(seen[0], torch.tensor([2.5, 2.5]))


RESUME_CASES = [
    ("flux", "lora", {}),
    ("sd3", "lora", {}),
    ("sdxl", "dreambooth", {}),  # the full pipeline folder
    ("sdxl", "textualInversion", {}),  # two embedding tables, each saved as its trained rows
    ("sdxl", "lora", {"lora": {"trainTextEncoder": True}}),  # adapters in the UNet and both text encoders
]


@pytest.mark.parametrize("family,method,sections", RESUME_CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_resume_after_sigterm_gives_the_same_run(family, method, sections, family_dirs, concept_dir, tmp_path):
    """SIGTERM mid-run, then the same command: the same loss rows bit for bit, the same stop step
    (with re-sampled reference timesteps, so the reference generator must resume too), the same artifacts."""
    import subprocess

    from test_resume import STEP_LINE, command, read_rows, straight_beside_interrupted, trainer_env

    manifest = job(family_dirs[family](), concept_dir, family, method, training={
        "maxSteps": 40, "batchSize": 2, "learningRate": 5e-3, "resolution": tiny_families.RESOLUTION[family],
        "seed": 0, "checkpointEvery": 5}, **sections)
    manifest["spec"]["earlyStopping"] = {"criterion": "dvar", "window": 6, "threshold": 0.5, "evalEvery": 1,
                                         "referenceBatchSize": 2, "fixed": {"timesteps": False}}
    manifest["spec"]["reporting"] = {"logEverySteps": 1}  # the interrupt waits for the line of step 4
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(manifest))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, stdout = straight_beside_interrupted(config, tmp_path, at_step=4, timeout=600)
    assert code == 143, stdout[-3000:]
    proc = subprocess.run(command(config, resumed), capture_output=True, text=True,
                          env=trainer_env(tmp_path / "resumed.termination"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and int(STEP_LINE.search(proc.stdout).group(1)) > 4
    want, got = read_rows(straight / "losses.csv"), read_rows(resumed / "losses.csv")
    assert got == want and len(want) > 6
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((resumed / "result.json").read_text())
    assert b["earlyStop"] == a["earlyStop"]
    for name in a["artifact"]["files"]:
        assert artifact_content(resumed / name) == artifact_content(straight / name), name


def test_frozen_text_encoders_encode_each_caption_once(family_dirs, concept_dir, monkeypatch):
    """The prompt cache (what makes offloading T5 possible) gives the same conditioning as encoding
    the batch directly, and encodes every distinct caption once."""
    from personalize.prompt_cache import PromptCache
    from personalize.spec import parse_spec

    folder = family_dirs["flux"]()
    spec = parse_spec(job(folder, concept_dir, "flux")["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    calls = []
    real = models.family.encode_prompts
    monkeypatch.setattr(models.family, "encode_prompts", lambda m, te, captions, d: calls.append(list(captions)) or real(m, te, captions, d))
    cache = PromptCache(models)
    cache.warm(["a photo of lun", "lun on a table"])
    cache.offload_text_encoders()
    batch = ["lun on a table", "a photo of lun", "lun on a table"]
    got = cache(batch, "cpu")
    assert calls == [["a photo of lun", "lun on a table"]]
    with torch.no_grad():
        want = real(models, models.text_encoder, batch, "cpu")
    for name, tensor in want.tensors.items():
        torch.testing.assert_close(got[name], tensor)
    assert all(next(e.parameters()).device.type == "cpu" for e in models.text_encoders)


def initial_rows(encoder, tokenizer, word: str, count: int) -> torch.Tensor:
    """The rows a new token starts from: the initializer word's embedding (mean of its pieces)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].mean(dim=0).detach().expand(count, -1).clone()


def test_sdxl_textual_inversion_learns_both_encoders_and_loads_in_the_stock_pipeline(family_dirs, concept_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    folder = family_dirs["sdxl"]()
    out, result, rows = run_job(job(folder, concept_dir, "sdxl", "textualInversion", training={
        "maxSteps": 3, "batchSize": 2, "learningRate": 5e-2, "resolution": 32}), tmp_path)
    assert result["artifact"]["files"] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    det = [float(r["deterministic_loss"]) for r in rows]
    assert len(det) == 3 and len(set(det)) > 1
    token = result["identifier"]

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    encoders = {"": (pipe.text_encoder, pipe.tokenizer), "_2": (pipe.text_encoder_2, pipe.tokenizer_2)}
    learned = {k: load_file(out / f"learned_embeds{k}.safetensors")[token] for k in encoders}
    start = {k: initial_rows(enc, tok, "triangle", 1) for k, (enc, tok) in encoders.items()}
    for k in encoders:  # each encoder's row moved away from where it started
        assert learned[k].shape == start[k].shape and not torch.allclose(learned[k], start[k])
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for k in encoders:
        save_file({token: start[k].contiguous()}, str(untrained / f"learned_embeds{k}.safetensors"))

    def images_with(first: Path, second: Path) -> np.ndarray:
        """The documented two calls: one file per text encoder, with its tokenizer."""
        stock = StableDiffusionXLPipeline.from_pretrained(folder)
        stock.load_textual_inversion(str(first / "learned_embeds.safetensors"), token=token,
                                     text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
        stock.load_textual_inversion(str(second / "learned_embeds_2.safetensors"), token=token,
                                     text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
        return generate(stock, "sdxl", f"a photo of {token}")

    trained = images_with(out, out)
    assert not np.array_equal(trained, images_with(untrained, untrained))
    assert not np.array_equal(trained, images_with(out, untrained))  # the second encoder's row matters too


def test_sdxl_deterministic_loss_with_trained_embeddings_reads_both_encoders(family_dirs, concept_dir):
    """Textual Inversion re-encodes the reference captions at each evaluation: L_det is constant
    while the rows are frozen, and changes when only the second encoder's row changes."""
    from personalize.identifier import add_to_more_encoders, setup_identifier
    from personalize.spec import parse_spec

    folder = family_dirs["sdxl"]()
    spec = parse_spec(job(folder, concept_dir, "sdxl", "textualInversion")["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    identifier = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=True,
                                  initializer="triangle")
    second = models.family.identifier_encoders(models)[1]
    add_to_more_encoders(identifier, [second], "triangle")
    assert identifier.ids_in("text_encoder_2") == [len(second.tokenizer) - 1]
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}, "captions": ["{token} on a table"]})
    examples = load_concept_examples(concept, identifier.text, 32)
    reference = ReferenceBatch(examples, size=2, seed=0, models=models, text_encoder_trained=True)
    values = {reference.deterministic_loss(models.denoiser, models.text_encoder) for _ in range(3)}
    assert len(values) == 1
    with torch.no_grad():
        second.module.get_input_embeddings().weight[identifier.ids_in("text_encoder_2")] += 0.5
    assert reference.deterministic_loss(models.denoiser, models.text_encoder) not in values


def lora_keys(path) -> set[str]:
    from safetensors.torch import load_file

    return {key.split(".")[0] for key in load_file(path)}


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_text_encoder_lora_loads_into_the_stock_text_encoders(family, family_dirs, concept_dir, tmp_path):
    """lora.trainTextEncoder: adapters on the CLIP encoder(s) train, are saved under the names the
    stock `load_lora_weights` reads, and change what the stock text encoders return."""
    from personalize.pipeline_io import builtin_tiny_world_folder

    folder = builtin_tiny_world_folder() if family == "sd" else family_dirs[family]()
    manifest = job(folder, concept_dir, family, "lora", lora={"rank": 4, "trainTextEncoder": True},
                   training={"maxSteps": 3, "batchSize": 2, "learningRate": 5e-2, "resolution": 32})
    out, result, rows = run_job(manifest, tmp_path)
    det = [float(r["deterministic_loss"]) for r in rows]
    assert len(set(det)) > 1
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    assert lora_keys(out / "pytorch_lora_weights.safetensors") == {"unet", *encoders}

    pipe = stock_pipeline(folder)
    prompt = f"a photo of {result['identifier']}"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        before = {name: getattr(pipe, name)(ids)[0] for name in encoders}
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        for name in encoders:  # each stock text encoder got its trained adapter
            assert not torch.allclose(getattr(pipe, name)(ids)[0], before[name]), name


def test_sdxl_time_ids_follow_each_image(family_dirs, tmp_path, monkeypatch):
    """Micro-conditioning: a training example's (original size, crop corner, target size) is that
    of its own image before resizing and of the square actually cut; the reference batch's are its
    fixed images' central squares."""
    from PIL import Image

    from personalize.data import Augment
    from personalize.spec import parse_spec

    images = tmp_path / "images"
    images.mkdir()
    sizes = {"wide.png": (96, 48), "tall.png": (40, 80), "square.png": (32, 32)}  # (width, height)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    folder = family_dirs["sdxl"]()
    spec = parse_spec(job(folder, images, "sdxl")["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    concept = Concept.model_validate({"images": {"path": str(images)}})
    examples = load_concept_examples(concept, "lun", 32, augment=Augment(random_crop=True))
    by_file = {f.name: examples.geometry[i].tolist() for i, f in enumerate(examples.files)}
    # resized: wide 48x96 -> 32x64 (central left 16), tall 80x40 -> 64x32 (central top 16)
    assert by_file == {"wide.png": [48, 96, 0, 16], "tall.png": [80, 40, 16, 0], "square.png": [32, 32, 0, 0]}

    seen = []
    real = models.denoiser.forward
    monkeypatch.setattr(models.denoiser, "forward",
                        lambda *a, **k: seen.append(k["added_cond_kwargs"]["time_ids"].clone()) or real(*a, **k))
    # training draws: random crops, each batch row's time ids are its own image's
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        batch, captions, geometry = examples.draw(3, generator)
        for square, (h, w, top, left) in zip(batch, geometry.tolist()):
            index = next(i for i, f in enumerate(examples.files) if [h, w] == by_file[f.name][:2])
            assert torch.equal(square, examples.resized[index][:, top:top + 32, left:left + 32])
        cond = models.family.encode_prompts(models, models.text_encoder, captions, "cpu").with_image_geometry(geometry)
        latents = torch.zeros(3, 4, 16, 16)  # 32 px: the tiny VAE downsamples by 2
        with torch.no_grad():
            models.family.loss(models.denoiser, models, latents, latents, torch.tensor([1, 2, 3]), cond)
        want = torch.cat([geometry.float(), torch.full((3, 2), 32.0)], dim=1)
        assert torch.equal(seen[-1], want)
    # the reference batch: its slots' central squares, the same at every evaluation
    reference = ReferenceBatch(examples, size=3, seed=0, models=models, text_encoder_trained=False)
    for _ in range(2):
        reference.deterministic_loss(models.denoiser, models.text_encoder)
        slots = [by_file[examples.files[i].name] for i in reference.indices]
        assert seen[-1].tolist() == [[float(v) for v in g] + [32.0, 32.0] for g in slots]


@pytest.mark.parametrize("family", FAMILIES)
def test_per_timestep_losses_come_with_the_deterministic_loss_to_the_bit(family, family_dirs, concept_dir):
    from personalize.spec import parse_spec

    folder = family_dirs[family]()
    spec = parse_spec(job(folder, concept_dir, family)["spec"])
    models = models_of(load_base_pipeline(BaseModelSource(path=str(folder)), spec), spec)
    concept = Concept.model_validate({"images": {"path": str(concept_dir)}})
    examples = load_concept_examples(concept, "lun", tiny_families.RESOLUTION[family])
    reference = ReferenceBatch(examples, size=3, sub_batches=2, seed=0, models=models, text_encoder_trained=False)
    evaluation = reference.evaluate(models.denoiser, models.text_encoder)
    assert evaluation.loss == reference.deterministic_loss(models.denoiser, models.text_encoder)
    assert sorted(evaluation.timestep_losses.values()) == sorted(reference.slot_losses(models.denoiser, models.text_encoder))
    if family == "sdxl":  # DDPM: the timestep index
        names = {f"t={int(t):04d}" for t in reference.timesteps}
    else:  # flow matching: the slot's noise level
        names = {f"sigma={float(models.noise_scheduler.sigmas[int(t)]):.4f}" for t in reference.timesteps}
    assert set(evaluation.timestep_losses) == names
