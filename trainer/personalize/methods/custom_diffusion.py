"""Custom Diffusion: the cross-attention key/value projections plus the new token's embedding.

As diffusers' own Custom Diffusion training does, every cross-attention layer (attn2) gets a
`CustomDiffusionAttnProcessor2_0` whose `to_k_custom_diffusion` / `to_v_custom_diffusion` start as
copies of the layer's to_k / to_v; those copies are trained, so the UNet's own weights stay
untouched and `unet.save_attn_procs` writes the standard Custom Diffusion weight file. The
processor sits inside a `RoutedAttnProcessor` (routing.py), so that concepts packed in one batch
each use their own.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
)

from personalize.methods.base import LEARNED_EMBEDS, Method
from personalize.routing import RoutedAttnProcessor

CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


class CustomDiffusion(Method):
    name = "customDiffusion"
    learns_embedding = True
    packable = True

    def cross_attention(self) -> dict[str, torch.nn.Module]:
        """The cross-attention layers (attn2) by their processor's name."""
        unet = self.models.unet
        return {name: unet.get_submodule(name.removesuffix(".processor"))
                for name in unet.attn_processors if name.endswith("attn2.processor")}

    def prepare(self) -> None:
        # every cross-attention layer gets a routed processor (once per pack), and in it this
        # concept's own Custom Diffusion processor; self-attention is unchanged
        for attn in self.cross_attention().values():
            if not isinstance(attn.processor, RoutedAttnProcessor):
                attn.set_processor(RoutedAttnProcessor(self.routing, AttnProcessor2_0()))
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True,
                train_q_out=False,
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )
            with torch.no_grad():
                processor.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
                processor.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            attn.processor.by_route[self.route] = processor.to(attn.to_k.weight.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        kv = [p for attn in self.cross_attention().values()
              for p in attn.processor.by_route[self.route].parameters()]
        return kv + self.add_identifier_rows([self.models.family.identifier_encoders(self.models)[0]])

    @property
    def text_encoder_trained(self) -> bool:
        return True

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.models.unet, self.models.text_encoder]

    def save(self, output_dir: Path) -> list[str]:
        # diffusers' own writer saves the unet's current processors: this concept's, for a moment
        unet = self.models.unet
        current, cross = dict(unet.attn_processors), self.cross_attention()
        mine = {name: cross[name].processor.by_route[self.route] if name in cross
                else CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False) for name in current}
        unet.set_attn_processor(mine)
        try:
            unet.save_attn_procs(output_dir, weight_name=CUSTOM_DIFFUSION_WEIGHTS, safe_serialization=True)
        finally:
            unet.set_attn_processor(current)
        return [CUSTOM_DIFFUSION_WEIGHTS, self.save_learned_embeds(output_dir)]

    def release(self) -> None:
        super().release()
        for attn in self.cross_attention().values():
            if self.route in attn.processor.by_route:
                del attn.processor.by_route[self.route]


def load_custom_diffusion(pipe, output_dir: str | Path, token: str, weight_name: str = CUSTOM_DIFFUSION_WEIGHTS,
                          embeds_name: str = LEARNED_EMBEDS) -> None:
    """Load a Custom Diffusion artifact into a StableDiffusionPipeline (`weight_name`, `embeds_name`:
    the files' names when output.name renamed them).

    Equivalent to `pipe.unet.load_attn_procs(dir, weight_name=...)` +
    `pipe.load_textual_inversion(...)`, which is what diffusers documents; in diffusers <= 0.42
    `load_attn_procs` silently installs nothing (huggingface/diffusers#9320) and cannot load a
    safetensors Custom Diffusion file (the empty self-attention entries are dropped), so we
    install the processors ourselves from the same file.
    """
    output_dir = Path(output_dir)
    state = safetensors.torch.load_file(str(output_dir / weight_name))
    processors = dict(pipe.unet.attn_processors)
    for name in processors:
        k = state.get(f"{name}.to_k_custom_diffusion.weight")
        if k is None:
            continue
        processor = CustomDiffusionAttnProcessor(
            train_kv=True, train_q_out=False, hidden_size=k.shape[0], cross_attention_dim=k.shape[1]
        )
        processor.load_state_dict({key.removeprefix(f"{name}."): v for key, v in state.items() if key.startswith(f"{name}.")})
        processors[name] = processor.to(pipe.unet.device, pipe.unet.dtype)
    pipe.unet.set_attn_processor(processors)
    pipe.load_textual_inversion(str(output_dir / embeds_name), token=token)
