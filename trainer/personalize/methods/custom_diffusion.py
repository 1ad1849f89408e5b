"""Custom Diffusion: the cross-attention key/value projections plus the new token's embedding.

As diffusers' own Custom Diffusion training does, every cross-attention layer (attn2) gets a
`CustomDiffusionAttnProcessor2_0` whose `to_k_custom_diffusion` / `to_v_custom_diffusion` start as
copies of the layer's to_k / to_v; those copies are trained, so the UNet's own weights stay
untouched and `unet.save_attn_procs` writes the standard Custom Diffusion weight file.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0

from personalize.methods.base import EmbeddingRowsKeeper, Method

CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


class CustomDiffusion(Method):
    name = "customDiffusion"
    learns_embedding = True

    def prepare(self) -> None:
        unet = self.models.unet
        processors = {}
        for name in unet.attn_processors:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if not name.endswith("attn2.processor"):  # self-attention: unchanged behaviour, no weights
                processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
                continue
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True,
                train_q_out=False,
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )
            with torch.no_grad():
                processor.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
                processor.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            processors[name] = processor.to(attn.to_k.weight.device)
        unet.set_attn_processor(processors)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        kv = [p for name, p in self.models.unet.named_parameters() if "_custom_diffusion" in name]
        embeddings = self.models.text_encoder.get_input_embeddings()
        self.keepers = [EmbeddingRowsKeeper(embeddings, self.identifier.token_ids)]
        return kv + [embeddings.weight]  # of the table only the identifier's rows change

    @property
    def text_encoder_trained(self) -> bool:
        return True

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.models.unet, self.models.text_encoder]

    def save(self, output_dir: Path) -> list[str]:
        self.models.unet.save_attn_procs(output_dir, weight_name=CUSTOM_DIFFUSION_WEIGHTS, safe_serialization=True)
        return [CUSTOM_DIFFUSION_WEIGHTS, self.save_learned_embeds(output_dir)]


def load_custom_diffusion(pipe, output_dir: str | Path, token: str) -> None:
    """Load a Custom Diffusion artifact into a StableDiffusionPipeline.

    Equivalent to `pipe.unet.load_attn_procs(dir, weight_name=...)` +
    `pipe.load_textual_inversion(...)`, which is what diffusers documents; in diffusers <= 0.42
    `load_attn_procs` silently installs nothing (huggingface/diffusers#9320) and cannot load a
    safetensors Custom Diffusion file (the empty self-attention entries are dropped), so we
    install the processors ourselves from the same file.
    """
    output_dir = Path(output_dir)
    state = safetensors.torch.load_file(str(output_dir / CUSTOM_DIFFUSION_WEIGHTS))
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
    pipe.load_textual_inversion(str(output_dir / "learned_embeds.safetensors"), token=token)
