"""Comparing saved artifacts across processes."""

from __future__ import annotations

from pathlib import Path


def artifact_content(path: Path):
    """A file's bytes; for safetensors, every tensor's exact bytes and the metadata as a mapping;
    for a folder (a saved pipeline), that of each file in it, by relative path.

    safetensors writes its metadata mapping in a per-process hash order, so two processes that
    save the same weights and metadata may order the header differently.
    """
    if path.is_dir():  # a saved pipeline: every file in it, by relative path
        return {str(f.relative_to(path)): artifact_content(f) for f in sorted(path.rglob("*")) if f.is_file()}
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
        return tensors, f.metadata()
