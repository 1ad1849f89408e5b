"""Randomly initialised Stable Diffusion 1.5 and SDXL pipelines, built from their architectures
so that nothing is downloaded: the packing benchmark's GPU models (bf16, 512 px and 1024 px).

`size="full"` is the published architecture (SD 1.5: a 860M-parameter UNet, CLIP ViT-L/14's text
encoder, the 84M-parameter VAE; SDXL: the 2.6B-parameter UNet and both text encoders); "tiny"
keeps every block type and the conditioning (SDXL's pooled text and time ids) at a width a CPU
runs in seconds, so that the test suite walks the same path. Weights are random: step times and
memory are the real ones, losses are not. The tokenizer is the CLIP BPE vocabulary the trainer
ships (trainer/personalize/assets/tiny_world/tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "trainer" / "personalize" / "assets" / "tiny_world" / "tokenizer"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", steps_offset=1, clip_sample=False)


def _text(hidden: int, layers: int, heads: int, projection: int = 0) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu" if not projection
                          else "gelu", projection_dim=projection or hidden)


def _vae(full: bool, sample_size: int, scaling: float) -> AutoencoderKL:
    channels = (128, 256, 512, 512) if full else (8, 16, 16, 16)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=channels,
                         layers_per_block=2 if full else 1, norm_num_groups=32 if full else 8,
                         sample_size=sample_size, scaling_factor=scaling)


def _write(folder: Path, index: dict, parts: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in parts.items():
        module.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_sd15(folder: Path, size: str = "full", seed: int = 0) -> Path:
    full = size == "full"
    torch.manual_seed(seed)
    hidden = 768 if full else 32
    unet = UNet2DConditionModel(
        sample_size=64 if full else 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 32, 64, 64), layers_per_block=2 if full else 1,
        cross_attention_dim=hidden, attention_head_dim=8, norm_num_groups=32 if full else 8)
    text_encoder = CLIPTextModel(_text(hidden, 12 if full else 2, 12 if full else 4))
    parts = {"unet": unet, "text_encoder": text_encoder, "vae": _vae(full, 512 if full else 64, 0.18215),
             "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER), "scheduler": DDPMScheduler(**SCHEDULER)}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    return _write(folder, index, parts)


def build_sdxl(folder: Path, size: str = "full", seed: int = 0) -> Path:
    full = size == "full"
    torch.manual_seed(seed)
    hidden1, hidden2 = (768, 1280) if full else (32, 32)
    unet = UNet2DConditionModel(
        sample_size=128 if full else 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280) if full else (32, 64, 64), layers_per_block=2 if full else 1,
        transformer_layers_per_block=(1, 2, 10) if full else (1, 1, 1),
        attention_head_dim=(5, 10, 20) if full else (2, 4, 4), cross_attention_dim=hidden1 + hidden2,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256 if full else 8,
        projection_class_embeddings_input_dim=(256 if full else 8) * 6 + hidden2, norm_num_groups=32 if full else 8)
    parts = {
        "unet": unet,
        "text_encoder": CLIPTextModel(_text(hidden1, 12 if full else 2, 12 if full else 4)),
        "text_encoder_2": CLIPTextModelWithProjection(_text(hidden2, 32 if full else 2, 20 if full else 4, hidden2)),
        "vae": _vae(full, 1024 if full else 64, 0.13025),
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER),
        "tokenizer_2": CLIPTokenizer.from_pretrained(TOKENIZER),
        "scheduler": DDPMScheduler(**SCHEDULER),
    }
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": True,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "image_encoder": [None, None], "feature_extractor": [None, None]}
    return _write(folder, index, parts)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl}
