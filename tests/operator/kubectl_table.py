"""`kubectl get pj` as kubectl prints it, from the CRD's additionalPrinterColumns: the cells the
API server's table convertor computes (simple `.a.b.c` JSONPaths), formatted as kubectl does
(a number's shortest form, a date as its age) and aligned by its tabwriter (cells padded by 3
spaces, at least 6 wide)."""

from __future__ import annotations

import datetime
from typing import Any, Optional

MIN_WIDTH, PADDING = 6, 3


def cell(obj: dict, path: str) -> Any:
    value: Any = obj
    for part in path.lstrip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def age(timestamp: str, now: datetime.datetime) -> str:
    """kubectl's short duration: 45s, 11m, 3h5m, 2d."""
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int((now - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 8 * 3600:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{seconds // 86400}d" if seconds >= 2 * 86400 else f"{seconds // 3600}h"


def text(value: Any, kind: str, now: datetime.datetime) -> str:
    if value is None:
        return ""
    if kind == "date":
        return age(value, now)
    if isinstance(value, float):
        return repr(value)  # Go's %v: the shortest form that reads back as the same float
    return str(value)


def render(columns: list[dict], objects: list[dict], wide: bool = False,
           now: Optional[datetime.datetime] = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    shown = [c for c in columns if wide or not c.get("priority")]
    header = ["NAME", *(c["name"].upper() for c in shown)]
    rows = [[o["metadata"]["name"], *(text(cell(o, c["jsonPath"]), c["type"], now) for c in shown)] for o in objects]
    widths = [max(MIN_WIDTH, max(len(r[i]) for r in [header, *rows]) + PADDING) for i in range(len(header))]
    return "\n".join("".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + r[-1] for r in [header, *rows])
