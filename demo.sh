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
# How far training moved the samples towards the concept: tiny-CLIP image similarity (CLIP-I) of
# the before/after grids (same prompts, same noise) to the concept's photos.
TRANSFORMERS_VERBOSITY=error python3 - <<'PY'
from pathlib import Path
from PIL import Image
import transformers
transformers.utils.logging.disable_progress_bar()
from personalize.samples import grid_tiles
from personalize.world.scoring import clip_i_score, load_tiny_clip
clip, _ = load_tiny_clip()
photos = [Image.open(p).convert("RGB") for p in sorted(Path("demo-output/concept-images").iterdir())]
before, after = (grid_tiles(Image.open(f"demo-output/{name}").convert("RGB"), 32) for name in ("samples_before.png", "samples.png"))
print(f"CLIP-I to the concept photos: before {clip_i_score(clip, before, photos):.3f}, after {clip_i_score(clip, after, photos):.3f}"
      " (compare demo-output/samples_before.png with demo-output/samples.png)")
PY
