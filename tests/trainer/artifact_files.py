"""Comparing saved artifacts across processes."""

from __future__ import annotations

from pathlib import Path


def artifact_content(path: Path):
    """A file's bytes; for safetensors, every tensor's exact bytes and the metadata as a mapping.

    safetensors writes its metadata mapping in a per-process hash order, so two processes that
    save the same weights and metadata may order the header differently.
    """
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
        return tensors, f.metadata()
