"""How one training stage ended: the record the loop returns, the report summarises and a
checkpoint keeps for the stages a resumed run skips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from personalize.spec import ReferenceInfo, StopReason


@dataclass
class StageOutcome:
    name: str
    max_steps: int
    stop_step: int
    reason: StopReason
    criterion: str
    window_evaluations: int
    threshold: float
    train_loss: Optional[float]
    deterministic_loss: Optional[float]
    convergence_value: Optional[float]
    reference: Optional[ReferenceInfo]
    seconds: float
    tracking_seconds: float = 0.0  # of `seconds`, spent evaluating the stop signal (L_det, CLIP check)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reason"] = self.reason.value
        data["reference"] = self.reference.model_dump(mode="json") if self.reference is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageOutcome":
        fields = dict(data)
        fields["reason"] = StopReason(fields["reason"])
        if fields.get("reference") is not None:
            fields["reference"] = ReferenceInfo.model_validate(fields["reference"])
        return cls(**fields)

    def to_report(self) -> dict[str, Any]:
        """The stage's entry in result.json's `stages`."""
        return {"name": self.name, "stopStep": self.stop_step, "maxSteps": self.max_steps, "reason": self.reason.value,
                "convergenceValue": self.convergence_value, "threshold": self.threshold,
                "seconds": round(self.seconds, 3), "trackingSeconds": round(self.tracking_seconds, 3)}
