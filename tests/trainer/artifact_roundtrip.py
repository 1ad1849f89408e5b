"""A run's artifacts through the stock diffusers loaders, shared by the mixed-precision tests and
benchmarks/precision_matrix.py: load them the documented way into a pipeline of a given dtype,
sample, and check what the samples must show (a module of its own, not conftest, so that a
benchmark script can import it too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from personalize.methods import load_custom_diffusion

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_dtype(precision: str) -> torch.dtype:
    """The half dtype a run's artifacts are also sampled in: its own, bf16 for an fp32 run."""
    return HALF.get(precision, torch.bfloat16)


def stock_pipeline(out: Path, result: dict, base_dir: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The run's artifacts loaded the documented way, into a pipeline of `dtype`."""
    files, token = set(result["artifact"]["files"]), result["identifier"]
    folder = out / "pipeline" if "pipeline" in files else base_dir
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None)
    if "pytorch_custom_diffusion_weights.safetensors" in files:
        load_custom_diffusion(pipe, out, token)
    elif "learned_embeds.safetensors" in files and "pipeline" not in files:
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"), token=token)
    if "pytorch_lora_weights.safetensors" in files:
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_pipeline(base_dir: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, token: str) -> np.ndarray:
    return pipe(f"a photo of {token}", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def saved_dtypes(out: Path) -> set[str]:
    """The dtypes of every tensor in the run's artifacts (checkpoints aside)."""
    dtypes = set()
    for path in out.rglob("*.safetensors"):
        if "checkpoints" in path.parts:
            continue
        with safe_open(str(path), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return dtypes


def check_round_trip(out: Path, result: dict, base_dir: Path, precision: str) -> None:
    """Raises AssertionError unless: every artifact tensor is fp32; the stock pipeline samples
    finite images in fp32 and in the half dtype; its fp32 sample differs from the base model's
    for the same prompt and noise (the artifacts carry what was trained)."""
    dtypes = saved_dtypes(out)
    assert dtypes == {"F32"}, f"artifact dtypes {sorted(dtypes)}, expected only F32"
    token = result["identifier"]
    for dtype in (torch.float32, half_dtype(precision)):
        images = sample(stock_pipeline(out, result, base_dir, dtype), token)
        assert images.shape == (1, 32, 32, 3), f"{dtype}: sample shape {images.shape}"
        assert np.isfinite(images).all(), f"{dtype}: non-finite sample"
        if dtype == torch.float32:
            trained = images
    untrained = sample(base_pipeline(base_dir), token)
    assert not np.array_equal(trained, untrained), "the stock-loaded sample equals the base model's"
