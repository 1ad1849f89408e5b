"""Bad input (issue 2, item 8): one line `error: ...` naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from personalize.run import main

from conftest import job_spec


def write(tmp_path, spec):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def few_images(tmp_path, concept_dir, n):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(concept_dir.iterdir())[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def corrupt_images(tmp_path, concept_dir):
    folder = few_images(tmp_path, concept_dir, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return folder


def not_a_pipeline(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "unet").mkdir()
    return folder


def broken_pipeline(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    return folder


def unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "out"  # a directory cannot be created under a regular file (even as root)


CASES = {
    # name: (change(spec, tmp_path, concept_dir, pipeline_dir) -> output dir or None, expected message)
    "missing images": (lambda s, t, c, p: s["concept"]["images"].update(path=str(t / "nope")), "concept image folder .* does not exist"),
    "empty image folder": (lambda s, t, c, p: (t / "empty").mkdir() or s["concept"]["images"].update(path=str(t / "empty")), "has no images"),
    "corrupt image": (lambda s, t, c, p: s["concept"]["images"].update(path=str(corrupt_images(t, c))), "image .*broken.jpg.* cannot be read"),
    "too few images": (lambda s, t, c, p: s["concept"]["images"].update(path=str(few_images(t, c, 1))), "2 reference examples, but the concept has only 1 image"),
    "reference batch too large": (lambda s, t, c, p: s["earlyStopping"].update(referenceBatchSize=8), "8 reference examples, but the concept has only 6"),
    "holdout leaves nothing": (lambda s, t, c, p: s["earlyStopping"].update(referenceBatchSize=3, referenceSubBatches=2, holdout=True), "leaves no training images"),
    "model path missing": (lambda s, t, c, p: s["baseModel"].update(path=str(t / "nomodel")), "baseModel.path .* does not exist"),
    "model not a pipeline": (lambda s, t, c, p: s["baseModel"].update(path=str(not_a_pipeline(t))), "is not a diffusers pipeline folder"),
    "model folder broken": (lambda s, t, c, p: s["baseModel"].update(path=str(broken_pipeline(t))), "cannot be loaded as a Stable Diffusion pipeline"),
    "token in vocabulary": (lambda s, t, c, p: s["concept"].update(token="dog"), "concept.token 'dog' already exists in the tokenizer's vocabulary"),
    "unwritable output": (lambda s, t, c, p: unwritable_output(t), "output directory .* is not writable"),
    "clip without a model": (lambda s, t, c, p: s["earlyStopping"].update(criterion="clip"), "earlyStopping.clip.modelPath: criterion clip needs a CLIP model"),
    "unknown method": (lambda s, t, c, p: s.update(method="hypernetwork"), "spec.method: Input should be 'textualInversion'"),
    "unknown criterion": (lambda s, t, c, p: s["earlyStopping"].update(criterion="patience"), "spec.earlyStopping.criterion: Input should be 'dvar'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line_and_exit_2(case, tiny_pipeline_dir, concept_dir, tmp_path, capsys):
    change, expected = CASES[case]
    spec = job_spec(tiny_pipeline_dir, concept_dir, "textualInversion")
    output = change(spec, tmp_path, concept_dir, tiny_pipeline_dir) or tmp_path / "out"
    code = main(["--config", str(write(tmp_path, spec)), "--output", str(output)])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert len(error_lines) == 1 and err.rstrip().splitlines()[-1] == error_lines[0]
    assert re.search(expected, error_lines[0]), error_lines[0]
    assert "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown method", "missing images"])  # caught before heavy imports
def test_cli_process_prints_only_the_error_line(case, tiny_pipeline_dir, concept_dir, tmp_path):
    change, expected = CASES[case]
    spec = job_spec(tiny_pipeline_dir, concept_dir, "textualInversion")
    change(spec, tmp_path, concept_dir, tiny_pipeline_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "--config", str(write(tmp_path, spec)), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(expected, lines[0])
