"""What a pack keeps on disk besides its members' own folders: OUT/pack.json, and how DIR is read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PACK_FILE = "pack.json"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
POLL_SECONDS = 0.5  # how often an idle pack looks for new manifests


def read_manifests(folder: Path) -> dict[str, Path]:
    """The manifests in `folder` by file stem (hidden entries, e.g. a ConfigMap's `..data`, skipped)."""
    if not folder.is_dir():
        raise NotADirectoryError(f"--jobs {folder}: not a readable folder")
    return {p.stem: p for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and p.suffix in MANIFEST_SUFFIXES and p.is_file()}


@dataclass
class MemberRecord:
    """One member's line in pack.json."""

    name: str
    phase: str = "Pending"  # Pending | Running | Succeeded | UploadFailed | Failed | Cancelled
    joined_at: Optional[int] = None  # pack step after which it joined
    left_at: Optional[int] = None
    steps: int = 0
    stop_reason: Optional[str] = None
    message: Optional[str] = None
    token: Optional[str] = None  # the identifier it trains: a restart gives `token: auto` the same one

    def to_json(self) -> dict:
        return {"name": self.name, "phase": self.phase, "joinedAt": self.joined_at, "leftAt": self.left_at,
                "steps": self.steps, "stopReason": self.stop_reason, "message": self.message, "token": self.token}


@dataclass
class PackRecord:
    members: dict[str, MemberRecord] = field(default_factory=dict)
    step: int = 0  # pack steps (each trains every active slot once)
    concept_steps: int = 0
    wall_seconds: float = 0.0
    training_seconds: float = 0.0  # of the wall time, in training steps (no loading, outputs or joins)
    max_slots: int = 8

    def to_json(self) -> dict:
        return {"step": self.step, "conceptSteps": self.concept_steps, "wallSeconds": round(self.wall_seconds, 3),
                "trainingSeconds": round(self.training_seconds, 3),
                "conceptStepsPerSecond": round(self.concept_steps / self.wall_seconds, 4) if self.wall_seconds else None,
                "maxSlots": self.max_slots, "slots": [m.to_json() for m in self.members.values()]}

    @classmethod
    def load(cls, path: Path) -> "PackRecord":
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        members = {}
        for m in data.get("slots", []):
            # an upload that failed is retried by the next attempt: the member is read again
            phase = "Pending" if m.get("phase") == "UploadFailed" else m.get("phase", "Pending")
            members[m["name"]] = MemberRecord(m["name"], phase, m.get("joinedAt"), m.get("leftAt"),
                                              m.get("steps", 0), m.get("stopReason"), m.get("message"), m.get("token"))
        return cls(members, data.get("step", 0), data.get("conceptSteps", 0), data.get("wallSeconds", 0.0),
                   data.get("trainingSeconds", 0.0))
