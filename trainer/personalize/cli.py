"""`personalize-train`: run one PersonalizationJob locally, or replay a recorded loss series."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "replay":
        from personalize import replay

        return replay.main(argv[1:])
    from personalize import run

    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
