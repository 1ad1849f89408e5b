"""The tiny world's CLIP with a convolutional image tower.

A ViT of the tiny world's size learns shape an order of magnitude more slowly than a small
CNN with batch norm (docs/tiny_world.md, "probes"), so the world's CLIP pairs the usual CLIP
text tower (which the Stable Diffusion pipeline conditions on) with a transformers
`ResNetModel`. transformers has no dual encoder that takes a ResNet, hence this small class.

It offers what scoring and pretraining use of `CLIPModel`: `get_image_features`,
`get_text_features`, `logit_scale`, `text_model` (the tower `text_encoder_from_clip` copies),
`save_pretrained` / `from_pretrained`. A folder holds `conv_clip.json` (the configs) and
`model.safetensors` (every weight, batch-norm statistics included).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, ResNetConfig, ResNetModel

CONFIG_NAME = "conv_clip.json"
WEIGHTS_NAME = "model.safetensors"
BN_COUNTER = "num_batches_tracked"


def resnet_config(widths: tuple[int, ...]) -> ResNetConfig:
    """Basic-block ResNet, one block per stage; the first stage keeps the 32x32 input's
    resolution after the stem (a 32x32 image has little to spare)."""
    return ResNetConfig(embedding_size=widths[0], hidden_sizes=list(widths), depths=[1] * len(widths),
                        layer_type="basic", downsample_in_first_stage=False)


class ConvClip(torch.nn.Module):
    def __init__(self, text_config: CLIPTextConfig, image_config: ResNetConfig, projection_dim: int, image_size: int):
        super().__init__()
        self.text_config = text_config
        self.image_config = image_config
        self.image_size = image_size
        self.text_tower = CLIPTextModelWithProjection(text_config)
        self.image_tower = ResNetModel(image_config)
        self.image_projection = torch.nn.Linear(image_config.hidden_sizes[-1], projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def text_model(self) -> torch.nn.Module:
        """The text transformer (no projection): what the diffusion pipeline conditions on."""
        return self.text_tower.text_model

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) unnormalised text embeddings."""
        return self.text_tower(input_ids=input_ids).text_embeds

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) unnormalised image embeddings; pixels (N, 3, H, W) in [-1, 1]."""
        pooled = self.image_tower(pixel_values=pixel_values).pooler_output  # (N, C, 1, 1)
        return self.image_projection(pooled.flatten(1))

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architecture": "ConvClip", "text_config": self.text_config.to_dict(),
                  "image_config": self.image_config.to_dict(),
                  "projection_dim": self.image_projection.out_features, "image_size": self.image_size}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        # clone: the text tower may tie tensors, and safetensors refuses shared storage. Batch
        # norm's step counter is left out: it only matters for momentum=None, and it is the one
        # integer tensor, so the file stays all float (fp16 in the shipped world).
        weights = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items() if not k.endswith(BN_COUNTER)}
        save_file(weights, folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "ConvClip":
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(CLIPTextConfig(**config["text_config"]), ResNetConfig(**config["image_config"]),
                    config["projection_dim"], config["image_size"])
        missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS_NAME), strict=False)
        missing, unexpected = ([k for k in keys if not k.endswith(BN_COUNTER)] for keys in (missing, unexpected))
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match its {CONFIG_NAME}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(dtype)


def is_conv_clip_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()
