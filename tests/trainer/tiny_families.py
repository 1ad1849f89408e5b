"""Random-weight tiny pipelines of SDXL, SD3 and FLUX.1, in diffusers' folder layout, built
offline with configs as small as diffusers' own fast pipeline tests use
(tests/pipelines/{stable_diffusion_xl,stable_diffusion_3,flux}). The CLIP tokenizer is the one the
trainer ships; the T5 tokenizer is a tiny Unigram model built with the `tokenizers` library and
saved as a T5TokenizerFast folder (nothing can be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from personalize.world.tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, load_tokenizer

T5_WORDS = "a photo of the in on with red striped triangle dog cat thing picture table sks lun style".split()
T5_MAX_LENGTH = 16  # tokens per prompt (FLUX.1 uses 512, SD3 up to 256; tiny keeps it cheap)


def clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32, max_position_embeddings=77, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID, hidden_act="gelu",
    )


def t5_tokenizer() -> T5TokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0 - i * 0.01) for i, w in enumerate(T5_WORDS)]
    vocab += [("\u2581", -3.0)] + [(ch, -5.0) for ch in letters]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )


def t5_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    ))


def flow_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config()), text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_flux(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer_2 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(1), text_encoder=CLIPTextModel(clip_config()),
        tokenizer=load_tokenizer(), text_encoder_2=t5_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sd3(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer_3 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config()), tokenizer=load_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer_2=load_tokenizer(),
        text_encoder_3=t5_encoder(len(tokenizer_3)), tokenizer_3=tokenizer_3, transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


BUILDERS = {"sdxl": build_sdxl, "flux": build_flux, "sd3": build_sd3}
RESOLUTION = {"sdxl": 32, "flux": 16, "sd3": 16}  # pixels trained and sampled


def write_foreign_pipeline(folder: Path, class_name: str) -> Path:
    """A pipeline folder of a family the trainer does not support (only model_index.json matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder
