"""`personalize-train`: run one PersonalizationJob locally, or replay a recorded loss series."""

from __future__ import annotations

import contextlib
import sys

PROG = "personalize-train"
OTHER_MODES = f"""
other modes:
  {PROG} replay FILE [...]   where each criterion would have stopped on a recorded loss series
                                 (`{PROG} replay --help`)
  {PROG} pack --jobs DIR --output OUT
                                 train every manifest in DIR in one process and one batch
                                 (`{PROG} pack --help`)
  {PROG} --version           print the version"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        import personalize

        print(f"{PROG} {personalize.version()}")
        return 0
    if argv and argv[0] == "pack":
        from personalize import pack_runner

        return pack_runner.main(argv[1:])
    if argv and argv[0] == "replay":
        from personalize import replay

        return replay.main(argv[1:])
    from personalize import run

    if argv[:1] in (["-h"], ["--help"]):
        with contextlib.suppress(SystemExit):  # argparse exits after printing the run's usage
            run.main(["--help"])
        print(OTHER_MODES)
        return 0
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
