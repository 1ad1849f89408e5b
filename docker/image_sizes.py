"""The image stage's sizes as a results file. docker/images.sh measures the images it built and
calls this to write benchmarks/results/image_sizes.{json,md}: each image whole (its base
included) against its budget, what it adds to the base, and the parts named with --part.

    python docker/image_sizes.py --base localhost/pj-standin-python:bookworm-… 151 \
        --image operator 342 400 --image trainer 1640 1800 \
        --part operator kubernetes 126 --part trainer torch 754 --out benchmarks/results

Standard library only: it runs on the build host, before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def report(base: tuple[str, int], images: list[tuple[str, int, int]], parts: list[tuple[str, str, int]]) -> dict:
    base_name, base_mb = base
    return {
        "world": None,  # no tiny world: container images
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit(),
        "units": "MB (10^6 bytes), as buildah reports image sizes",
        "base": {"image": base_name, "mb": base_mb},
        "images": {name: {"mb": mb, "budget_mb": budget, "over_base_mb": mb - base_mb,
                          "parts_mb": {what: part_mb for image, what, part_mb in parts if image == name}}
                   for name, mb, budget in images},
    }


def markdown(data: dict) -> str:
    lines = ["# Image sizes (docker/images.sh)", "",
             f"Commit {data['commit']}, {data['date']}; base `{data['base']['image']}`, {data['base']['mb']} MB; "
             f"{data['units']}.", "",
             "| image | whole image | budget | on top of the base | parts (MB) |", "|---|---|---|---|---|"]
    for name, image in data["images"].items():
        parts = ", ".join(f"{what} {mb}" for what, mb in image["parts_mb"].items()) or "-"
        lines.append(f"| {name} | {image['mb']} | {image['budget_mb']} | {image['over_base_mb']} | {parts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs=2, metavar=("IMAGE", "MB"), required=True)
    parser.add_argument("--image", nargs=3, action="append", metavar=("NAME", "MB", "BUDGET_MB"), required=True)
    parser.add_argument("--part", nargs=3, action="append", default=[], metavar=("IMAGE", "WHAT", "MB"),
                        help="MB that WHAT (e.g. an installed package) takes inside IMAGE")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = {name for name, _, _ in args.image}
    unknown = sorted({image for image, _, _ in args.part} - names)
    if unknown:
        parser.error(f"--part names an image without --image: {', '.join(unknown)}")
    data = report((args.base[0], int(args.base[1])), [(n, int(mb), int(b)) for n, mb, b in args.image],
                  [(image, what, int(mb)) for image, what, mb in args.part])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "image_sizes.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "image_sizes.md").write_text(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
