"""A Stable Diffusion pipeline as one checkpoint file in the original (CompVis/LDM) key layout,
the form fine-tuned checkpoints are shared in (`model.safetensors` / `.ckpt`):

    model.diffusion_model.*     the UNet, in the original block numbering (input_blocks, middle_block, output_blocks)
    first_stage_model.*         the VAE (encoder.down.N.block.M, mid.attn_1, decoder.up.N reversed)
    cond_stage_model.transformer.text_model.*   the CLIP text encoder

diffusers ships only the other direction (loaders/single_file_utils.py), so the tests write the
file with the rules below and check that diffusers' converter gives back every tensor exactly
(`test_single_file.py`), which is what makes the rules right.
"""

from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET.get(name, name)}.{tail}"


def unet_key(key: str, config) -> str:
    per_level = config.layers_per_block + 1
    for diffusers, ldm in UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 + int(m[1]) * per_level + int(m[3])
        return f"input_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{index}.1.{m[4]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = int(m[1]) * per_level + int(m[3])
        return f"output_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        has_attention = "CrossAttn" in config.up_block_types[block]
        return f"output_blocks.{block * per_level + per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no original name for UNet key {key}")


def vae_key(key: str, config) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    n = len(config.up_block_types)
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


def original_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one state dict in the original layout."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state[f"model.diffusion_model.{unet_key(key, pipe.unet.config)}"] = value
    for key, value in pipe.vae.state_dict().items():
        ldm = vae_key(key, pipe.vae.config)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        state[f"first_stage_model.{ldm}"] = value
    for key, value in pipe.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{name}"] = value
    return {k: v.contiguous() for k, v in state.items()}
