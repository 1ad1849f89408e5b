"""Tiny Stable-Diffusion-family components built from configs (no downloads).

Two sizes share one architecture family:
  * `TinyConfig.test()`       random weights for fast tests (UNet ~1M params)
  * `TinyConfig.pretrained()` the tiny world's pretrained model (see tinyworld/pretrain.py)

Images are 32x32 RGB; the VAE downsamples 4x to 8x8x4 latents; the text encoder is the text
tower of a small CLIPModel using the real CLIP BPE tokenizer shipped in assets/tiny_world/tokenizer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tiny_world" / "tokenizer"  # vocab.json + merges.txt, as in real SD folders
TINY_WORLD_DIR = ASSETS_DIR / "tiny_world"

VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407  # also the padding token, as in Stable Diffusion's CLIP tokenizer
MAX_TEXT_LENGTH = 77


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks -> 2 downsamplings -> 4x
    vae_layers_per_block: int = 1
    unet_channels: tuple[int, ...] = (48, 96)
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 4
    unet_norm_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    vision_patch: int = 8
    projection_dim: int = 64
    image_tower_widths: tuple[int, ...] = (32, 64, 128)  # the ConvClip's ResNet stages

    @classmethod
    def pretrained(cls) -> "TinyConfig":
        return cls()

    @classmethod
    def test(cls) -> "TinyConfig":
        return cls(
            vae_channels=(16, 16, 32),
            unet_channels=(32, 64),
            unet_attention_heads=2,
            text_hidden=32,
            text_layers=2,
            text_heads=2,
            vision_hidden=32,
            vision_layers=2,
            vision_heads=2,
            projection_dim=32,
        )

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def text_config(cfg: TinyConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=cfg.projection_dim,
        hidden_act="quick_gelu",
        # The pooled output is read at the first EOS token: the ids must be the real ones.
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )


def vision_config(cfg: TinyConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.vision_patch,
        num_channels=3,
        projection_dim=cfg.projection_dim,
        hidden_act="quick_gelu",
    )


def build_clip(cfg: TinyConfig, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=text_config(cfg).to_dict(),
        vision_config=vision_config(cfg).to_dict(),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


def build_conv_clip(cfg: TinyConfig, seed: int = 0) -> "ConvClip":
    """The world's CLIP: the CLIP text tower with a small ResNet image tower (conv_clip.py)."""
    from personalize.world.conv_clip import ConvClip, resnet_config

    torch.manual_seed(seed)
    return ConvClip(text_config(cfg), resnet_config(cfg.image_tower_widths), cfg.projection_dim, cfg.image_size)


def build_text_encoder(cfg: TinyConfig, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(text_config(cfg))


def text_encoder_from_clip(clip) -> CLIPTextModel:
    """The CLIP text tower (of a CLIPModel or a ConvClip) as a standalone CLIPTextModel (what
    Stable Diffusion conditions on)."""
    config = clip.text_config if hasattr(clip, "text_config") else clip.config.text_config
    text_encoder = CLIPTextModel(config)
    # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
    target = getattr(text_encoder, "text_model", text_encoder)
    target.load_state_dict(clip.text_model.state_dict())
    return text_encoder


def build_vae(cfg: TinyConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: TinyConfig, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_attention_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def load_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def assemble_pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer | None = None
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer or load_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(seed: int = 0, cfg: TinyConfig | None = None) -> StableDiffusionPipeline:
    """A random-weight tiny pipeline in memory (the test size by default)."""
    cfg = cfg or TinyConfig.test()
    return assemble_pipeline(build_unet(cfg, seed), build_vae(cfg, seed + 1), build_text_encoder(cfg, seed + 2))


def build_tiny_pipeline_folder(path: str | Path, seed: int = 0, cfg: TinyConfig | None = None) -> Path:
    """Write a random-weight tiny StableDiffusionPipeline folder loadable with from_pretrained."""
    out = Path(path)
    build_tiny_pipeline(seed, cfg).save_pretrained(out, safe_serialization=True)
    return out


def copy_tokenizer(dest: str | Path) -> None:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_DIR.iterdir():
        shutil.copy2(file, dest / file.name)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
