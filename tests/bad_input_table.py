"""The table format of docs/bad-input.md, shared by the operator's cases (O1, O2, ...:
tests/operator/bad_input_cases.py) and the trainer's (T1, T2, ...: tests/trainer/trainer_bad_input_cases.py).

A row is `| <prefix><n> | area | input | what the user sees |`; each list of cases renders its
own rows, and a drift test compares them with the rows of that prefix in the document.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
HEADER = "| # | area | input | what the user sees |\n|---|---|---|---|\n"


def row_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^\| {prefix}\d+ \|.*\n?", flags=re.M)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_rows(prefix: str, rows: list[tuple[str, str, str]]) -> str:
    """(area, input, what the user sees) per case, numbered from 1."""
    lines = [f"| {prefix}{n} | {area} | {_cell(given)} | {_cell(seen)} |" for n, (area, given, seen) in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"


def documented_rows(text: str, prefix: str) -> str:
    """The rows of this prefix as they are in the document."""
    return "".join(m.group(0).rstrip("\n") + "\n" for m in row_pattern(prefix).finditer(text))


def replace_rows(text: str, prefix: str, rendered: str) -> str | None:
    """`text` with this prefix's rows replaced by `rendered` where the first one stands;
    None when the document has none of them yet (the caller decides where they go)."""
    pattern = row_pattern(prefix)
    first = pattern.search(text)
    if first is None:
        return None
    return text[:first.start()] + rendered + pattern.sub("", text[first.start():])
