"""Which held-out concepts a pretrained tiny world never saw, recorded next to its weights.

A concept only measures personalization if pretraining never rendered it. The concept sets can
grow after a world was pretrained (the world's code changes, its weights do not), so the weights
carry their own list and scoring code checks against it:

    write_record(world_dir)                        # pretraining: this world held out today's sets
    unseen = held_out_by(world_dir)                # names of the concepts it never saw
    world_fingerprint(world_dir)                   # which weights these are (results name it)
    installed_world()                              # the fingerprint of the world the trainer ships
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from personalize.world.shapes import CONCEPT_SETS, DEV_CONCEPTS

RECORD_FILE = "held_out_concepts.json"


def write_record(world_dir: str | Path) -> Path:
    path = Path(world_dir) / RECORD_FILE
    path.write_text(json.dumps({name: [c.name for c in concepts] for name, concepts in CONCEPT_SETS.items()}, indent=1) + "\n")
    return path


def held_out_by(world_dir: str | Path) -> frozenset[str]:
    """Names of the concepts the world at world_dir was pretrained without."""
    path = Path(world_dir) / RECORD_FILE
    if not path.is_file():
        # Worlds pretrained before the dev/test split carry no record; they held out the dev set.
        return frozenset(c.name for c in DEV_CONCEPTS)
    return frozenset(name for names in json.loads(path.read_text()).values() for name in names)


def world_fingerprint(world_dir: str | Path) -> str:
    """12 hex digits of a SHA-256 over the world's weight files (names and bytes): results
    computed on one world must not be mistaken for another's."""
    digest = hashlib.sha256()
    for path in sorted(Path(world_dir).rglob("*.safetensors")):
        digest.update(path.relative_to(world_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def installed_world() -> str:
    """The fingerprint of the tiny world installed with the trainer (`baseModel.builtin`)."""
    from personalize.world.tiny_models import TINY_WORLD_DIR  # torch-heavy: only when asked

    return world_fingerprint(TINY_WORLD_DIR)
