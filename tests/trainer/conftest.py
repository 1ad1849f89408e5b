"""Fixtures for the trainer tests: a random-weight tiny pipeline folder and a concept's images.

The machine's 2 cores are shared with other jobs; one thread per test process avoids the
oversubscription that makes small-tensor work many times slower.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# No test may ask a cloud metadata server for credentials (botocore would try 169.254.169.254).
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

TEST_CONCEPT = "red_striped_triangle"


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from personalize.world.tiny_models import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> Path:
    from personalize.world import concept_by_name, write_concept_images

    folder = tmp_path_factory.mktemp("concept") / "images"
    write_concept_images(concept_by_name(TEST_CONCEPT), 6, folder, seed=0)
    return folder


@pytest.fixture
def base_pipe(tiny_pipeline_dir):
    """A fresh copy of the tiny pipeline (tests change it in place)."""
    from personalize.pipeline_io import load_base_pipeline
    from personalize.spec import BaseModelSource

    pipe = load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


