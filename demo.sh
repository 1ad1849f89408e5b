#!/usr/bin/env bash
# One-command demo: install (CPU torch from the local cache), write a held-out concept's photos,
# and personalize the embedded tiny model on them with DVAR early stopping. No GPU, no download.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[trainer]" -c constraints.txt
python3 -m pip uninstall -y -q torchvision timm 2>/dev/null || true
python3 - <<'PY'
from personalize.world.shapes import concept_by_name, write_concept_images
paths = write_concept_images(concept_by_name("red_striped_triangle"), 8, "demo-output/concept-images", seed=0)
print(f"wrote {len(paths)} concept images to demo-output/concept-images")
PY
personalize-train --config demo/job.yaml --output demo-output
